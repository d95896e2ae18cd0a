"""What training and serving share: prompt rendering (prompt.py), configuration (config.py,
schedules.py), the repository and run layout (paths.py), atomic writes (atomic.py), the memory
model (memory.py, the budget and training's checks; memory_model.py, training_budget.py,
batch_probe.py, worker_budget.py, device.py), the run folder's contract with its readers
(metadata.py) and the optimised BLAS (blas.py). The import graph: core <- train, core <- worker, bench -> both.

Importing this package first loads an optimised BLAS on Linux (core/blas.py), so every entry
point gets it before mlx is imported.
"""

from core.blas import load_fast_blas as _load_fast_blas

_load_fast_blas()
