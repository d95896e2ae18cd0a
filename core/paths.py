"""Where everything lives. The one place that knows the repository's layout.

Module constants are the repository's fixed places; `Layout` is one run's folders, built once
(from --models-dir/--logs-dir, else $MODELS_DIR/$LOGS_DIR, else models/ and logs/) and passed
down to whatever reads or writes them.
"""

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
RAW = DATA / "raw"
SAMPLE = DATA / "sample"
GENERAL_TEXT = DATA / "general"  # the forgetting check's text (make eval)
# MODELS_DIR / LOGS_DIR move the run outputs (tests point them at temporary folders).
MODELS = Path(os.environ.get("MODELS_DIR") or ROOT / "models")
LOGS = Path(os.environ.get("LOGS_DIR") or ROOT / "logs")
DOCS = ROOT / "docs"
CONFIG = ROOT / "train" / "config.yaml"
TINY_MODEL = ROOT / "models" / "tiny-mistral"  # built models stay in the repository
TINY_MODEL_4BIT = ROOT / "models" / "tiny-mistral-4bit"
BENCH_MODEL = ROOT / "models" / "bench-mistral"
SMOLLM_MODEL = ROOT / "models" / "smollm2-135m-instruct"  # make base-model
SMOLLM_MODEL_4BIT = ROOT / "models" / "smollm2-135m-instruct-4bit"
PROTOCOL_SCHEMA = DOCS / "protocol.schema.json"

METADATA = "metadata.json"
ADAPTERS = "adapters.safetensors"  # the names mlx_lm.load(adapter_path=) reads
ADAPTER_CONFIG = "adapter_config.json"
STEP_PREFIX = "step_"


def env_with_outputs_in(base):
    """os.environ for a child process (training, the worker) whose runs and logs go under `base`
    and which never fetches from the hub: what tests and benchmarks run them with."""
    return dict(
        os.environ,
        MODELS_DIR=str(Path(base) / "models"),
        LOGS_DIR=str(Path(base) / "logs"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FAST_BLAS_QUIET="1",
    )


def cache_dir():
    """Downloads kept outside the repository (the base model's wheel): $FARENSE_CACHE_DIR, else
    $XDG_CACHE_HOME/farense-lm, else ~/.cache/farense-lm."""
    if os.environ.get("FARENSE_CACHE_DIR"):
        return Path(os.environ["FARENSE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "farense-lm"


def step_name(step):
    """step_0000200: a checkpoint folder's name (seven digits, more when needed)."""
    return f"{STEP_PREFIX}{int(step):07d}"


@dataclass(frozen=True)
class Layout:
    """The folders and files of one training run:

    models/NAME/                  the bundle (run)
    models/NAME/checkpoints/      step_XXXXXXX/ (checkpoints, step(n))
    models/NAME/best/             the adapter with the lowest validation loss
    models/NAME/last/             the adapter of the last step
    logs/NAME/metrics.jsonl       one record per report (metrics)
    """

    name: str
    models: Path
    logs: Path

    @classmethod
    def for_run(cls, name, models_dir=None, logs_dir=None):
        models = Path(models_dir).resolve() if models_dir else MODELS
        logs = Path(logs_dir).resolve() if logs_dir else LOGS
        return cls(name=name, models=models, logs=logs)

    @property
    def run(self):
        return self.models / self.name

    @property
    def checkpoints(self):
        return self.run / "checkpoints"

    def step(self, step):
        return self.checkpoints / step_name(step)

    @property
    def best(self):
        return self.run / "best"

    @property
    def last(self):
        return self.run / "last"

    @property
    def metadata(self):
        return self.run / METADATA

    @property
    def log_dir(self):
        return self.logs / self.name

    @property
    def metrics(self):
        return self.log_dir / "metrics.jsonl"


def run_dir(name, models_dir=None):
    """models/NAME: the output bundle of one training run."""
    return Layout.for_run(name, models_dir).run
