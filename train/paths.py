"""Where everything lives. The one place that knows the repository's layout."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
RAW = DATA / "raw"
SAMPLE = DATA / "sample"
# MODELS_DIR / LOGS_DIR move the run outputs (tests point them at temporary folders).
MODELS = Path(os.environ.get("MODELS_DIR") or ROOT / "models")
LOGS = Path(os.environ.get("LOGS_DIR") or ROOT / "logs")
DOCS = ROOT / "docs"
CONFIG = ROOT / "train" / "config.yaml"
TINY_MODEL = ROOT / "models" / "tiny-mistral"     # built models stay in the repository
BENCH_MODEL = ROOT / "models" / "bench-mistral"
PROTOCOL_SCHEMA = DOCS / "protocol.schema.json"


def run_dir(name):
    """models/NAME: the output bundle of one training run."""
    return MODELS / name


def checkpoints_dir(name):
    return run_dir(name) / "checkpoints"


def step_dir(name, step):
    """models/NAME/checkpoints/step_0000200 (seven digits)."""
    return checkpoints_dir(name) / f"step_{step:07d}"


def best_dir(name):
    return run_dir(name) / "best"


def logs_dir(name):
    return LOGS / name


def metrics_file(name):
    return logs_dir(name) / "metrics.jsonl"
