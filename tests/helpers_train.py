"""Shared pieces of the training, evaluation and fuse tests: real subprocesses on the tiny
model (and on SmolLM2-135M-Instruct where the model must learn), every output under a temporary
MODELS_DIR / LOGS_DIR."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from core import paths

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-mistral"
PY = sys.executable

# A short run with every mechanism on: dropout (the RNG), frequent checkpoints and
# evaluations, a report per step (so a test can watch progress), pruning.
SMALL_CONFIG = {
    "model": "models/tiny-mistral",  # relative, as a user gives it (cwd: the repo)
    "seed": 0,
    "fine_tune_type": "lora",
    "num_layers": -1,
    "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.1},
    "batch_size": 4,
    "iters": 30,
    "learning_rate": 1e-3,
    "lr_schedule": {"name": "cosine", "warmup": 3, "min_lr": 1e-4},
    "max_seq_length": 256,
    "steps_per_report": 1,
    "steps_per_eval": 5,
    "save_every": 5,
    "keep_last": 3,
}

# The real-model run the learning claims rest on (tests/test_smollm_train.py): SmolLM2-135M-
# Instruct (make base-model), a small fixed budget - 4 LoRA blocks, 16 steps of 4 examples (2/3
# of an epoch), ~80 s of CPU time - with dropout on and a checkpoint every 4 steps, so that the
# same run is also the uninterrupted reference of the kill -9 test.
SMOLLM_CONFIG = {
    "model": "models/smollm2-135m-instruct",
    "num_layers": 4,
    "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.05},
    "batch_size": 4,
    "iters": 16,
    "learning_rate": 5e-4,
    "lr_schedule": {"name": "cosine", "warmup": 2, "min_lr": 1e-4},
    "steps_per_eval": 8,
    "save_every": 4,
}


def env_for(base, **extra):
    env = paths.env_with_outputs_in(base)
    env.pop("TRAIN_INJECT_NAN", None)
    env.pop("TRAIN_STEP_DELAY_S", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def prepare_data(out):
    """data/sample -> out/{train,valid}.jsonl, as `make data` does."""
    subprocess.run(
        [PY, "-m", "train.prepare_data", "--out", str(out), "--raw", str(ROOT / "data" / "sample")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out


def write_config(path, **overrides):
    cfg = dict(SMALL_CONFIG)
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def train_cmd(config, name, data, *extra):
    return [
        PY,
        "-m",
        "train.train",
        "--config",
        str(config),
        "--name",
        name,
        "--data",
        str(data),
        *map(str, extra),
    ]


def run_train(base, config, name, data, *extra, env=None, timeout=600):
    return subprocess.run(
        train_cmd(config, name, data, *extra),
        cwd=ROOT,
        env=env or env_for(base),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_module(base, module, *args, timeout=600):
    return subprocess.run(
        [PY, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env_for(base),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-6000:]}\n--- stdout\n{proc.stdout[-2000:]}"
    )
    return proc


def run_dir(base, name):
    return base / "models" / name


def metrics(base, name):
    path = base / "logs" / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(path):
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def max_abs_diff(a, b):
    assert set(a) == set(b), f"different weight names: {sorted(set(a) ^ set(b))[:5]}"
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def shared_base(tmp_path_factory):
    """The session folder test modules share: prepared data, the small config, the runs."""
    base = tmp_path_factory.getbasetemp() / "shared_train"
    base.mkdir(exist_ok=True)
    if not (base / "data" / "train.jsonl").exists():
        prepare_data(base / "data")
    if not (base / "small.yaml").exists():
        write_config(base / "small.yaml")
    return base


def reference_run(base):
    """The uninterrupted small run (30 steps) the resume tests compare against."""
    path, _ = trained(base / "ref", "run", base / "small.yaml", base / "data")
    return path


def smollm_reference_run(base):
    """The uninterrupted SmolLM2 run (SMOLLM_CONFIG), trained once per session under `base`
    (shared_base's folder); callers request the smollm_model fixture first."""
    config = base / "smollm.yaml"
    if not config.exists():
        write_config(config, **SMOLLM_CONFIG)
    path, _ = trained(base / "smollm", "run", config, base / "data")
    return path


def trained(base, name, config, data, *extra):
    """A finished run under `base`, trained once per test session (a marker file says so)."""
    marker = base / f".{name}.done"
    if not marker.exists():
        base.mkdir(parents=True, exist_ok=True)
        proc = ok(run_train(base, config, name, data, *extra))
        marker.write_text(proc.stderr)
    return run_dir(base, name), marker.read_text()
