"""A check's world: its temporary folder (data, configs, MODELS_DIR and LOGS_DIR there, so runs in
models/ are never touched), the training config every check trains with, running a child, and
Skip (the check does not apply here)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from core import paths

ROOT = paths.ROOT
TINY = paths.TINY_MODEL
TINY_4BIT = paths.TINY_MODEL_4BIT
PY = sys.executable
TRAIN_CONFIG = {
    "seed": 0,
    "fine_tune_type": "lora",
    "num_layers": -1,
    "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.0},
    "batch_size": 4,
    "iters": 8,
    "learning_rate": 1e-3,
    "lr_schedule": {"name": "cosine", "warmup": 2, "min_lr": 1e-4},
    "max_seq_length": 256,
    "steps_per_report": 1,
    "steps_per_eval": 4,
    "save_every": 2,
    "keep_last": 2,
    "patience": 0,
}


class Skip(Exception):
    """The check does not apply here (the reason is the line's detail)."""


def run(cmd, env, timeout, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def must(proc, what):
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        raise RuntimeError(f"{what} exited {proc.returncode}: {tail}")
    return proc


class Job:
    """The temporary folder of one check: data, configs, MODELS_DIR and LOGS_DIR."""

    def __init__(self, work):
        self.work = Path(work)
        self.data = self.work / "data"
        self.env = dict(paths.env_with_outputs_in(self.work), PYTHONUNBUFFERED="1")
        for hook in ("TRAIN_INJECT_NAN", "TRAIN_STEP_DELAY_S", "WORKER_TEST_IGNORE_EOS", "WORKER_TEST_FAULT"):
            self.env.pop(hook, None)

    def run_dir(self, name):
        return self.work / "models" / name

    def metrics(self, name):
        path = self.work / "logs" / name / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def config(self, name, model):
        path = self.work / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(dict(TRAIN_CONFIG, model=str(model), data=str(self.data))), encoding="utf-8"
        )
        return path

    def train_cmd(self, name, model):
        return [PY, "-m", "train.train", "--config", str(self.config(name, model)), "--name", name]
