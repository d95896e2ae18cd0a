"""What every measurement of `make bench` needs: the places, the progress log, child processes'
environments, the long-lived worker children, and the context a measurement runs in.

Statistics (medians, paired ratios, summaries) and table rows are `bench.report`'s. This module
imports no measurement: measurements import it, the runner imports both.
"""

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.worker_client import WorkerProcess
from core import paths

ROOT = paths.ROOT
RESULTS = ROOT / "bench" / "results"
DOC = paths.DOCS / "PERFORMANCE.md"
TINY = paths.TINY_MODEL
BENCH = paths.BENCH_MODEL

_T0 = time.perf_counter()


def elapsed():
    """Seconds since this process imported the benchmark."""
    return time.perf_counter() - _T0


def log(message):
    print(f"bench [{elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)


def rel(path):
    """A path relative to the repository when it is inside it (symlinks not followed)."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)


def sub_env(tmp=None, **extra):
    """os.environ for a child (training, the worker, mlx-lm's tools): never the hub, unbuffered;
    with tmp, its runs and logs go there (core.paths.env_with_outputs_in); extra on top."""
    if tmp is not None:
        env = paths.env_with_outputs_in(tmp)
    else:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_logged(cmd, env, log_path, timeout=600):
    """Run a subprocess with its output in log_path; raise with the log's tail on failure."""
    tic = time.perf_counter()
    with open(log_path, "ab") as f:
        p = subprocess.run(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=timeout
        )
    wall = time.perf_counter() - tic
    if p.returncode != 0:
        tail = Path(log_path).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}:\n{tail}")
    return wall


def weights_bytes(model_dir):
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


class Workers:
    """The long-lived worker children of this run, by role."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = {}
        self.models = {}

    def start(self, role, model_dir, env_extra=None):
        self.stop(role)
        env = sub_env(**(env_extra or {}))
        log(f"starting worker '{role}' on {rel(model_dir)}" + (f" with {env_extra}" if env_extra else ""))
        w = WorkerProcess(
            ["--model", str(model_dir)], env=env, stderr_path=Path(self.tmp) / f"worker-{role}.log"
        )
        tic = time.perf_counter()
        w.start()
        log(f"worker '{role}' ready in {time.perf_counter() - tic:.1f}s (blas {w.ready.get('blas')})")
        self.procs[role], self.models[role] = w, model_dir
        return w

    def get(self, role):
        return self.procs.get(role)

    def model(self, role):
        return self.models.get(role)

    def main(self, model_dir):
        """The 'main' worker on model_dir: the running one, or a new one in its place."""
        w = self.get("main") if self.model("main") == model_dir else None
        return w or self.start("main", model_dir)

    def stop(self, role):
        w = self.procs.pop(role, None)
        self.models.pop(role, None)
        if w is not None:
            w.close()

    def stop_all(self):
        for role in list(self.procs):
            self.stop(role)


@dataclass
class Context:
    """What a measurement's `measure(ctx)` gets: the plan (every measurement's settings),
    a temporary folder, the run's results (it writes `res[SECTION]`), the worker children,
    and tokenizers loaded once per model."""

    plan: dict
    tmp: Path
    res: dict
    workers: Workers
    tokenizers: dict = field(default_factory=dict)

    def tokenizer(self, model_dir):
        if model_dir not in self.tokenizers:
            from mlx_lm.utils import load_tokenizer

            self.tokenizers[model_dir] = load_tokenizer(Path(model_dir))
        return self.tokenizers[model_dir]

    def warn(self, text):
        """A note printed under the run's table (res["warnings"])."""
        self.res.setdefault("warnings", []).append(text)
