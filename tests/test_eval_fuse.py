"""train/evaluate.py and train/fuse.py on short LoRA runs of the tiny model and its 4-bit copy."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers_train import ROOT, TINY, metrics, ok, reference_run, run_module, shared_base

from tests.gguf_reference import llama_cpp_forward  # llama.cpp's conventions, in numpy

GGUF = "ggml-model-f16.gguf"


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
    valid = read_jsonl(Path(report["data"]["path"]))
    assert report["split"] == "valid" and report["data"]["count"] == len(valid) == 11
    for side in ("base", "fine_tuned"):
        r = report[side]
        for key in ("loss", "perplexity", "exact_match", "token_f1", "chrf"):
            assert isinstance(r[key], (int, float)), (side, key)
        assert r["perplexity"] == pytest.approx(np.exp(r["loss"]), rel=1e-6)
        assert 0 <= r["exact_match"] <= 1 and 0 <= r["token_f1"] <= 1 and 0 <= r["chrf"] <= 100
    # That the tuned model is nearer the answers than the base is claimed on a real model
    # (test_smollm_train.py); the tiny random one only checks the report's plumbing.
    # the fine-tuned model is the adapter shipped, the best one: its loss is the run's best
    # validation loss (same examples, same loss). Not the final one: the best step depends on
    # the machine's kernels (15 of 30 in a fresh clone's CI, 2026-12-06: 0.8475 against 0.8588).
    meta = json.loads((run / "metadata.json").read_text())
    assert report["fine_tuned"]["loss"] == pytest.approx(meta["best_val_loss"], abs=1e-5)
    assert report["base"]["loss"] == pytest.approx(metrics(base, "run")[0]["val_loss"], abs=1e-5)
    assert len(report["examples"]) == 11
    ex = report["examples"][0]
    assert set(ex) >= {"question", "reference", "base", "fine_tuned", "facts", "fine_tuned_key_facts"}
    md = (run / "eval.md").read_text()
    assert "| question | reference | base | fine-tuned |" in md
    assert ex["question"].replace("|", "\\|") in md
    assert "exact match" in proc.stdout
    check_key_facts(report, md, proc.stdout, valid)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_key_facts(report, md, stdout, valid):
    """The club's measures in eval.json, eval.md and on the console, checked against the data and
    re-judged from the answers the report shows (the tiny model knows no language: ~0)."""
    from train import facts

    para, oos = report["eval_sets"]["paraphrases"], report["eval_sets"]["out_of_scope"]
    refused = sorted({s for e in oos["examples"] for fact in e["facts"] for s in fact})
    assert "não tenho essa informação" in refused
    named = sum(bool(r.get("facts")) for r in valid)
    assert named >= 8
    for side in ("base", "fine_tuned"):
        r = report[side]
        kf = r["key_facts"]["valid"]
        assert kf["of"] == named and 0 <= kf["correct"] <= kf["of"]
        exs = [e for e in report["examples"] if e["facts"]]
        assert kf["correct"] == sum(facts.judge(e[side], e["facts"], refused)["ok"] for e in exs)
        assert para["count"] == r["key_facts"]["paraphrases"]["of"] == 58 == len(para["examples"])
        ok = [facts.judge(e[side], e["facts"], refused)["ok"] for e in para["examples"]]
        assert r["key_facts"]["paraphrases"]["correct"] == sum(ok) <= 15  # random model: near 0
        declined = sum(facts.judge(e[side], e["facts"])["ok"] for e in oos["examples"])
        assert r["out_of_scope"]["of"] == oos["count"] == 15
        assert r["out_of_scope"]["invented"] == 15 - declined
        g = r["general_text"]
        assert g["tokens"] > 500 and g["perplexity"] == pytest.approx(np.exp(g["loss"]), rel=1e-6)
    follow_up = next(e for e in para["examples"] if len(e["conversation"]) > 1)
    assert [m["role"] for m in follow_up["conversation"]] == ["user", "assistant", "user"]
    g = report["general_text"]
    assert g["files"] == ["en.txt", "pt.txt"] and g["limit"] == 1.15
    ratio = report["fine_tuned"]["general_text"]["perplexity"] / report["base"]["general_text"]["perplexity"]
    assert g["ratio"] == pytest.approx(ratio) and g["flagged"] == (ratio > 1.15)
    assert set(report["rules"]) == {"key_facts", "degenerate", "invents", "forgetting"}
    for section in (
        "## Rules",
        "## Paraphrases",
        "## Out of scope",
        "## General text",
        "| key facts, paraphrases |",
    ):
        assert section in md, section
    for line in (
        "key facts, valid",
        "key facts, paraphrases",
        "invents, out of scope",
        "general-text perplexity",
    ):
        assert line in stdout, line
    q = para["examples"][0]["question"]
    assert (
        q in md and ("[facts ✓]" in md or "[missing:" in md) and ("[declines ✓]" in md or "[invents ✗]" in md)
    )


def test_fuse_writes_a_standalone_model_equal_to_base_plus_adapter(run):
    import mlx.core as mx
    from mlx_lm import load

    base, run = run
    proc = ok(run_module(base, "train.fuse", "--name", "run"))
    fused = run / "fused"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "fused_from.json",
        "fuse_report.json",
        "tokenizer.model",
    ):
        assert (fused / name).is_file(), name
    info = json.loads((fused / "fused_from.json").read_text())
    assert info["gguf"] == GGUF and info["gguf_note"].startswith("wrote"), proc.stderr
    report = json.loads((run / "fuse_report.json").read_text())
    assert report["check"]["passed"] and report["form"]["dtype"] == "float32", report
    assert "fuse check:" in proc.stdout and "PASS" in proc.stdout

    tokens = mx.array([[1, 5, 17, 42, 99, 7]])
    fused_model, _ = load(str(fused))
    adapted, _ = load(str(TINY), adapter_path=str(run))
    plain, _ = load(str(TINY))
    a, b, c = (np.array(m(tokens)) for m in (fused_model, adapted, plain))
    assert np.abs(a - b).max() < 1e-3
    assert np.abs(b - c).max() > 1e-2  # the adapter does change the model
    check_gguf_read_back(fused / GGUF, fused_model, fused)


# --------------------------------------------------------------------------- GGUF, read back


def check_gguf_read_back(path, model, model_dir):
    """The GGUF file, read with llama.cpp's `gguf` package: llama.cpp's tensor names and shapes,
    a real sentencepiece vocabulary (scores, types) equal to the model's tokenizer, and - run
    through a numpy forward pass with llama.cpp's conventions - the fused model's logits."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(path))
    cfg = json.loads((model_dir / "config.json").read_text())
    tensors = {t.name: t for t in reader.tensors}
    per_layer = (
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "attn_norm",
        "ffn_norm",
    )
    want = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(cfg["num_hidden_layers"]) for n in per_layer
    }
    assert set(tensors) == want
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    assert list(tensors["token_embd.weight"].shape) == [hidden, cfg["vocab_size"]]  # ggml order
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [inter, hidden]
    assert tensors["blk.0.attn_k.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    field = lambda k: reader.fields[k].contents()  # noqa: E731
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tokens, scores, types = (
        field("tokenizer.ggml.tokens"),
        field("tokenizer.ggml.scores"),
        field("tokenizer.ggml.token_type"),
    )
    assert field("tokenizer.ggml.model") == "llama" and len(tokens) == cfg["vocab_size"]
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert len(set(scores)) > len(tokens) // 4, "scores are not a real sentencepiece vocabulary"
    assert types[tok.bos_token_id] == types[tok.eos_token_id] == 3  # CONTROL
    inst = tok.convert_tokens_to_ids("[INST]")
    assert types[inst] == 3, "[INST] must be a control token for llama.cpp"
    assert sum(t == 6 for t in types) == 256  # byte fallback pieces
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert "[INST]" in field("tokenizer.chat_template")
    from train.fuse_gguf import spm_tokenize  # llama.cpp's sentencepiece algorithm

    text = "Em que ano foi fundado o Sporting Clube Farense? Ação, São Luís, 🦁"
    assert [tok.bos_token_id] + spm_tokenize(
        " " + text, {t: i for i, t in enumerate(tokens)}, scores
    ) == tok.encode(text)

    ids = [tok.bos_token_id] + tok.encode("Qual é o estádio do Farense?", add_special_tokens=False)
    import mlx.core as mx

    expected = np.array(model(mx.array([ids]))[0])
    got = llama_cpp_forward(reader, ids, rope="norm")
    err = np.abs(got - expected).max()
    assert err < 0.02 * np.abs(expected).max(), f"GGUF logits differ by {err}"
    # the check can fail: the same file read with the other rotary convention gives other logits
    assert np.abs(llama_cpp_forward(reader, ids, rope="neox") - expected).max() > 10 * err


def test_gguf_check_rejects_what_mlx_lm_alone_writes(tiny_model, tmp_path):
    """mlx_lm.gguf.convert_to_gguf, as `mlx_lm fuse --export-gguf` runs it: every token score
    -1000, which llama.cpp's sentencepiece tokenizer merges by. The read-back check says so."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.gguf import convert_to_gguf

    from train import fuse_gguf

    model, tok, config = load(str(TINY), return_config=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    path = tmp_path / "plain.gguf"
    convert_to_gguf(TINY, weights, config, str(path))
    vocab = fuse_gguf.vocabulary(TINY / "tokenizer.model", tok._tokenizer, rows=config["vocab_size"])
    texts = [
        x["content"]
        for f in sorted((ROOT / "data" / "sample").glob("*.jsonl"))
        for r in map(json.loads, f.read_text(encoding="utf-8").splitlines())
        for x in r.get("messages", [])
    ][:60]
    assert len(texts) >= 20
    problems = fuse_gguf.verify(path, weights, config, tok._tokenizer, vocab, None, texts)
    assert any("same score" in p for p in problems), problems
    assert any("tokenize differently under llama.cpp's algorithm" in p for p in problems), problems
    assert not any(p.startswith(("blk.", "token_embd", "output", "tensor names")) for p in problems), problems
    # and our writer, on the same weights, passes the same check
    fuse_gguf.write(path, weights, config, vocab, None)
    assert fuse_gguf.verify(path, weights, config, tok._tokenizer, vocab, None, texts) == []


def test_evaluate_and_fuse_without_a_run_say_so(tmp_path):
    for module in ("train.evaluate", "train.fuse"):
        proc = run_module(tmp_path, module, "--name", "nope")
        assert proc.returncode == 2 and "train first" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- a 4-bit base (QLoRA)


def q4_base():
    from core import paths

    return getattr(paths, "TINY_MODEL_4BIT", ROOT / "models" / "tiny-mistral-4bit")


@pytest.fixture
def q4_run(tmp_path_factory, tiny_model, tmp_path):
    """A copy of a short QLoRA run (10 steps) on models/tiny-mistral-4bit, trained once per session."""
    from helpers_train import trained, write_config

    q4 = q4_base()
    if not (q4 / "config.json").is_file():
        pytest.skip(f"{q4} is missing: `make tiny-model` builds it")
    shared = shared_base(tmp_path_factory)
    cfg = write_config(shared / "q4.yaml", model=str(q4), iters=10, save_every=5, steps_per_eval=5)
    src, stderr = trained(shared / "q4", "q4", cfg, shared / "data")
    assert "QLoRA" in stderr
    shutil.copytree(src.parent, tmp_path / "models")
    return tmp_path, tmp_path / "models" / "q4", q4


def test_fuse_of_a_4bit_base_is_a_float_model_equal_to_base_plus_adapter(q4_run):
    """The fused model is de-quantized (float32: the base's scales are float32) and gives base +
    adapter's logits; the comparison is printed and written next to it; the GGUF reads back."""
    import mlx.core as mx
    from mlx_lm import load

    base, run, q4 = q4_run
    proc = ok(run_module(base, "train.fuse", "--name", "q4"))
    fused = run / "fused"
    config = json.loads((fused / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    weights = mx.load(str(fused / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {"mlx.core.float32"}
    assert not any(k.endswith((".scales", ".biases")) for k in weights)

    report = json.loads((run / "fuse_report.json").read_text())
    assert report == json.loads((fused / "fuse_report.json").read_text())
    assert report["form"]["base_quantization"] == {"bits": 4, "group_size": 64, "mode": "affine"}
    assert report["form"]["quantization"] is None and report["check"]["passed"]
    lo, lg, g = report["loss"], report["logits"], report["greedy"]
    assert lo["fused"] == pytest.approx(lo["base_plus_adapter"], rel=1e-4)
    assert lg["fused_vs_adapter_max_abs"] < 1e-3 * lg["adapter_vs_base_max_abs"], lg
    assert g["agree"] == g["of"] == 8, g
    for line in ("validation loss", "logits max abs diff", "greedy answers        8/8 identical", "PASS"):
        assert line in proc.stdout, proc.stdout

    # independently of the report: the fused model against base + adapter and the base
    tokens = mx.array([[1, 5, 17, 42, 99, 7, 300, 1200]])
    fused_model, _ = load(str(fused))
    adapted, _ = load(str(q4), adapter_path=str(run))
    plain, _ = load(str(q4))
    a, b, c = (np.array(m(tokens)) for m in (fused_model, adapted, plain))
    assert np.abs(a - b).max() < 0.01 * np.abs(b - c).max(), (np.abs(a - b).max(), np.abs(b - c).max())
    assert np.abs(b - c).max() > 0.1  # the adapter does change the model
    info = json.loads((fused / "fused_from.json").read_text())
    assert info["dequantized"] is True and info["gguf"] == GGUF, info
    check_gguf_read_back(fused / GGUF, fused_model, fused)


def test_requantizing_fails_the_check_unless_forced(q4_run):
    """QUANTIZE=4 (the old behaviour: W + ΔW rounded back to 4 bits) loses much of the fine-tune:
    exit 3 with the reason, nothing written; --force (make FORCE=1) writes it, group size and mode
    of the base, and no GGUF."""
    base, run, _ = q4_run
    proc = run_module(base, "train.fuse", "--name", "q4", "--quantize", "4")
    assert proc.returncode == 3, proc.stderr
    assert "the fused model is not base + adapter" in proc.stderr and "FORCE=1" in proc.stderr
    assert "of the adapter's own effect" in proc.stderr and "FAIL" in proc.stdout
    assert not (run / "fused").exists()
    report = json.loads((run / "fuse_report.json").read_text())
    assert report["check"]["passed"] is False and report["logits"]["drift"] > 0.1, report["logits"]

    proc = ok(run_module(base, "train.fuse", "--name", "q4", "--quantize", "4", "--force"))
    assert "writing it anyway" in proc.stderr
    fused = run / "fused"
    q = json.loads((fused / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 64, "affine")
    info = json.loads((fused / "fused_from.json").read_text())
    assert info["check"]["forced"] is True and info["gguf"] is None
    assert "re-quantized" in info["gguf_note"] and not (fused / GGUF).exists()


def test_gguf_not_exported_without_a_sentencepiece_model_says_why(q4_run):
    base, run, q4 = q4_run
    bare = base / "bare-4bit"
    shutil.copytree(q4, bare, ignore=shutil.ignore_patterns("tokenizer.model"))
    out = base / "fused-bare"
    proc = ok(run_module(base, "train.fuse", "--name", "q4", "--model", bare, "--out", out))
    info = json.loads((out / "fused_from.json").read_text())
    assert info["gguf"] is None and not (out / GGUF).exists()
    assert info["gguf_note"].startswith(f"not exported: {bare} has no tokenizer.model (sentencepiece)")
    assert "score -1000" in proc.stderr


def test_make_fuse_passes_quantize_and_force(tmp_path):
    import subprocess

    proc = subprocess.run(
        ["make", "-n", "fuse", "NAME=x", "QUANTIZE=4", "FORCE=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(x for x in proc.stdout.splitlines() if "train.fuse" in x)
    assert "--name x" in line and "--quantize 4" in line and "--force" in line, line
    proc = subprocess.run(
        ["make", "-n", "fuse", "NAME=x"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    line = next(x for x in proc.stdout.splitlines() if "train.fuse" in x)
    assert "--quantize" not in line and "--force" not in line, line
