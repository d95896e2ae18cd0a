"""Offline side: data preparation, training, evaluation, export; and the pieces the worker
shares with training (prompt formatting, config, paths).

Importing this package first loads an optimised BLAS on Linux (see train/blas.py), so every
entry point gets it before mlx is imported.
"""

from train.blas import load_fast_blas as _load_fast_blas

_load_fast_blas()
