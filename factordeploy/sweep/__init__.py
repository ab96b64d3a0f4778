"""`deploy sweep`: one verified build per method x ratio cell, a table and Pareto plots.

Sits above build.py (it runs builds); nothing imports it but the CLI.
"""

from .run import SweepConfig, SweepResult, run_sweep

__all__ = ["SweepConfig", "SweepResult", "run_sweep"]
