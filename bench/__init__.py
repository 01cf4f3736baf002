"""Benchmarks, not tests: `python -m bench.step` (a training step: ours vs transformers', fp32 vs bf16) and
`python -m bench.fisher` (the Fisher spectrum's cost)."""
