"""Offline side: data preparation, training, evaluation, export. What it shares with the
worker (prompt rendering, config, paths, ...) is in core/.

`import core` first: it loads the optimised BLAS before mlx (core/blas.py).
"""

import core  # noqa: F401  (side effect: fast BLAS before mlx)
