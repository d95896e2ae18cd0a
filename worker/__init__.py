"""The long-lived inference worker: NDJSON requests on stdin, NDJSON replies on stdout.

`import core` comes first so the optimised BLAS is loaded before mlx (core/blas.py).
"""

import os

os.environ.setdefault("FAST_BLAS_ROLE", "decode")  # core.blas: `make calibrate`'s choice for decoding
import core  # noqa: E402, F401  (side effect: fast BLAS before mlx)
