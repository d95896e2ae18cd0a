"""Benchmarks, always side by side with the anchor (mlx-lm) in one run.

`import core` first: it loads the optimised BLAS before mlx (core/blas.py).
"""

import core  # noqa: F401
