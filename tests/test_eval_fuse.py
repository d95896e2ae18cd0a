"""train/evaluate.py and train/fuse.py on a short LoRA run of the tiny model."""

import json
import shutil

import numpy as np
import pytest

from helpers_train import TINY, metrics, ok, reference_run, run_module, shared_base


@pytest.fixture
def run(tmp_path_factory, tiny_model, tmp_path):
    """A copy of the session's small reference run (30 LoRA steps on the tiny model)."""
    src = reference_run(shared_base(tmp_path_factory)).parent.parent
    shutil.copytree(src / "models", tmp_path / "models")
    shutil.copytree(src / "logs", tmp_path / "logs")
    return tmp_path, tmp_path / "models" / "run"


def test_evaluate_writes_side_by_side_metrics(run):
    base, run = run
    proc = ok(run_module(base, "train.evaluate", "--name", "run"))
    report = json.loads((run / "eval.json").read_text())
    assert report["split"] == "valid" and report["data"]["count"] == 9
    for side in ("base", "fine_tuned"):
        r = report[side]
        for key in ("loss", "perplexity", "exact_match", "token_f1", "chrf"):
            assert isinstance(r[key], (int, float)), (side, key)
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-6)
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["token_f1"] <= 1 and 0 <= r["chrf"] <= 100
    assert report["fine_tuned"]["loss"] < report["base"]["loss"]
    assert report["fine_tuned"]["chrf"] > report["base"]["chrf"]
    # the fine-tuned loss is the run's final validation loss: same examples, same loss
    meta = json.loads((run / "metadata.json").read_text())
    assert report["fine_tuned"]["loss"] == pytest.approx(meta["final_val_loss"], abs=1e-5)
    assert report["base"]["loss"] == pytest.approx(metrics(base, "run")[0]["val_loss"], abs=1e-5)
    assert len(report["examples"]) == 9
    ex = report["examples"][0]
    assert set(ex) >= {"question", "reference", "base", "fine_tuned"}
    md = (run / "eval.md").read_text()
    assert "| question | reference | base | fine-tuned |" in md
    assert ex["question"].replace("|", "\\|") in md
    assert "exact match" in proc.stdout


def test_fuse_writes_a_standalone_model_equal_to_base_plus_adapter(run):
    import mlx.core as mx
    from mlx_lm import load

    base, run = run
    proc = ok(run_module(base, "train.fuse", "--name", "run"))
    fused = run / "fused"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "fused_from.json"):
        assert (fused / name).is_file(), name
    gguf = fused / "ggml-model-f16.gguf"
    assert gguf.is_file() and gguf.read_bytes()[:4] == b"GGUF", proc.stderr
    info = json.loads((fused / "fused_from.json").read_text())
    assert info["gguf"] == "ggml-model-f16.gguf" and info["gguf_note"] is None

    tokens = mx.array([[1, 5, 17, 42, 99, 7]])
    fused_model, _ = load(str(fused))
    adapted, _ = load(str(TINY), adapter_path=str(run))
    plain, _ = load(str(TINY))
    a, b, c = (np.array(m(tokens)) for m in (fused_model, adapted, plain))
    assert np.abs(a - b).max() < 1e-3
    assert np.abs(b - c).max() > 1e-2          # the adapter does change the model


def test_evaluate_and_fuse_without_a_run_say_so(tmp_path):
    for module in ("train.evaluate", "train.fuse"):
        proc = run_module(tmp_path, module, "--name", "nope")
        assert proc.returncode == 2 and "train first" in proc.stderr, proc.stderr


def test_qlora_on_a_4bit_base_then_fuse_explains_the_gguf_limit(tmp_path_factory, tiny_model, tmp_path):
    """A quantized base: LoRA becomes QLoRA; the fused model stays 4-bit and mlx-lm cannot
    write GGUF from it (said clearly, fused model kept); --dequantize gives float + GGUF."""
    import mlx.core as mx
    from mlx_lm import convert, load

    from helpers_train import run_train, write_config

    shared = shared_base(tmp_path_factory)
    q4 = tmp_path / "tiny-4bit"
    convert(str(TINY), str(q4), quantize=True, q_group_size=64, q_bits=4)
    cfg = write_config(tmp_path / "q.yaml", model=str(q4), iters=4, save_every=2, steps_per_eval=2)
    proc = ok(run_train(tmp_path, cfg, "q", shared / "data"))
    assert "QLoRA:" in proc.stderr
    run = tmp_path / "models" / "q"
    lora = json.loads((run / "lora_config.json").read_text())
    assert lora["base_quantized"] is True
    model, _ = load(str(q4), adapter_path=str(run))
    assert model(mx.array([[1, 5, 17]])).shape[-1] == 1024

    proc = ok(run_module(tmp_path, "train.fuse", "--name", "q"))
    assert "GGUF not exported: the base is quantized" in proc.stderr and "--dequantize" in proc.stderr
    fused = run / "fused"
    assert (fused / "model.safetensors").is_file() and not (fused / "ggml-model-f16.gguf").exists()
    assert "quantization" in json.loads((fused / "config.json").read_text())
    load(str(fused))

    proc = ok(run_module(tmp_path, "train.fuse", "--name", "q", "--dequantize"))
    assert (fused / "ggml-model-f16.gguf").read_bytes()[:4] == b"GGUF"
    assert "quantization" not in json.loads((fused / "config.json").read_text())
