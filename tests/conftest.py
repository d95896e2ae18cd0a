import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-mistral"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model():
    """models/tiny-mistral, built once if missing (make test builds it first)."""
    if not (TINY / "config.json").exists():
        subprocess.run([sys.executable, "-m", "train.tiny_model", "--out", str(TINY)],
                       cwd=ROOT, check=True)
    return TINY
