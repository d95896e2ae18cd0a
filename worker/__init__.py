"""The long-lived inference worker: NDJSON requests on stdin, NDJSON replies on stdout.

`import core` comes first so the optimised BLAS is loaded before mlx (core/blas.py).
"""

import core  # noqa: F401  (side effect: fast BLAS before mlx)
