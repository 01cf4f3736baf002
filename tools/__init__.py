"""Helpers around the library, never imported by it: `python -m tools.get_mpnet` (all-mpnet-base-v2's weights)."""
