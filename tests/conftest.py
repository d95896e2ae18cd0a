import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-mistral"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tests run with core/blas.py's defaults, whatever `make calibrate` chose for this machine
# (tests/test_calibrate.py checks the calibrated path with a file of its own).
os.environ.setdefault("FAST_BLAS_CALIBRATION", "0")


TINY_4BIT = ROOT / "models" / "tiny-mistral-4bit"


def _build_tiny_models():
    if not (TINY / "config.json").exists() or not (TINY_4BIT / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "train.tiny_model", "--out", str(TINY), "--out-4bit", str(TINY_4BIT)],
            cwd=ROOT,
            check=True,
        )


@pytest.fixture(scope="session")
def tiny_model():
    """models/tiny-mistral, built once if missing (make test builds it first)."""
    _build_tiny_models()
    return TINY


@pytest.fixture(scope="session")
def tiny_model_4bit():
    """models/tiny-mistral-4bit: every linear layer 4-bit (group 64), float32 scales."""
    _build_tiny_models()
    return TINY_4BIT
