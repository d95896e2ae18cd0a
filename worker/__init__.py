"""The long-lived inference worker: NDJSON requests on stdin, NDJSON replies on stdout.

`import train` comes first so the optimised BLAS is loaded before mlx (train/blas.py).
"""

import train  # noqa: F401  (side effect: fast BLAS before mlx)
