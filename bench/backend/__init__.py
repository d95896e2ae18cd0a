"""The checks of `make check-backend` (bench/check_backend.py, which runs them and prints the
table), by concern: job (a check's temporary folder and environment, Skip), versions (what this
machine is), train_checks (tiny models, data, LoRA killed and resumed, QLoRA), serve_checks (the
worker, decode speed, memory, the Node client)."""
