"""deepopt benchmark suite: AdamW / SGD / Muon vs the deepopt optimizers on small tasks.

    python -m benchmarks.run                 # full suite (<= 45 min on 2 CPU cores)
    python -m benchmarks.run --quick         # smoke run (<= 3 min)

``tasks.py`` defines the tasks, ``optimizers.py`` the optimizer factory and LR grids,
``run.py`` the protocol (sweep, seeds, resumable cache), ``report.py`` the table and plots.
"""
