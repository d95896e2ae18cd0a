"""Offline side: data preparation, training, evaluation, export. What it shares with the
worker (prompt rendering, config, paths, ...) is in core/.

`import core` first: it loads the optimised BLAS before mlx (core/blas.py).
"""

import os

os.environ.setdefault("FAST_BLAS_ROLE", "train")  # core.blas: `make calibrate`'s choice for training
import core  # noqa: E402, F401  (side effect: fast BLAS before mlx)
