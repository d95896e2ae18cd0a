"""Benchmarks, always side by side with the anchor (mlx-lm) in one run.

`import train` first: it loads the optimised BLAS before mlx (train/blas.py).
"""

import train  # noqa: F401
