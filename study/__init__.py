"""
The study of the paper: its experiment grids (sweep), the converged protocol's rule (calibrate), the statistics and
effects behind every verdict (stats, effects), the report (report), and the theory measured on the real model
(ntk_study, spectrum). It imports the library at the root and is never imported by it. Run from the root:

    python -m study.sweep all --protocol conv --jobs 2
    python -m study.report all
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root: results/ and runs/ live here
