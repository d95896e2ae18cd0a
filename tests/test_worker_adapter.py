"""Adapter loading through metadata.json, and train/serve parity.

The fixture builds a tiny LoRA adapter on models/tiny-mistral (random lora_b, so it changes
the output), with a metadata.json per the contract: its own chat template, a system prompt
and generation defaults. The worker's greedy text must equal mlx_lm.generate on the token ids
that core.prompt.encode_prompt gives - the same function training uses.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import ROOT, TINY, Worker, ensure_tiny_model, worker_env  # noqa: E402

import train  # noqa: E402,F401  (fast BLAS before mlx, as everywhere)

PROMPT = "Quando foi fundado o Farense?"
SYSTEM = "És o assistente oficial do Sporting Clube Farense."
LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None}


def _template():
    """The tiny model's template with a marker after every [INST] (either quote style)."""
    base = (TINY / "chat_template.jinja").read_text(encoding="utf-8")
    marked = base.replace("'[INST] '", "'[INST] (farense) '").replace('"[INST] "', '"[INST] (farense) "')
    assert marked != base, "the tiny model's chat template has no '[INST] ' literal to mark"
    return marked


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    ensure_tiny_model()
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out = tmp_path_factory.mktemp("adapter") / "demo-adapter"
    out.mkdir()
    model, _ = load(str(TINY))
    mx.random.seed(0)  # lora_a's initialisation, then lora_b: deterministic
    linear_to_lora_layers(model, 4, LORA)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.2
    weights = {
        k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    assert weights
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": LORA})
    )
    (out / "metadata.json").write_text(
        json.dumps(
            {
                "format": 1,
                "base_model": "models/tiny-mistral",
                "base_model_path": str(TINY),
                "chat_template": _template(),
                "system_prompt": SYSTEM,
                "generation": {
                    "max_tokens": 24,
                    "max_tokens_cap": 64,
                    "temperature": 0.0,
                    "top_p": 1.0,
                    "top_k": 0,
                    "min_p": 0.0,
                    "repetition_penalty": 1.0,
                },
                "max_seq_length": 512,
                "fine_tune_type": "lora",
                "adapter_file": "adapters.safetensors",
            },
            ensure_ascii=False,
        )
    )
    return out


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """mlx_lm.generate with the adapter, on encode_prompt ids (metadata template + system prompt)."""
    from mlx_lm import generate, load

    from core.prompt import encode_prompt

    model, tok = load(str(TINY), adapter_path=str(adapter_dir))
    tok._tokenizer.chat_template = _template()
    ids = encode_prompt(tok, [{"role": "user", "content": PROMPT}], SYSTEM)
    text = generate(model, tok, ids, max_tokens=24)
    base_model, base_tok = load(str(TINY))
    base_text = generate(base_model, base_tok, ids, max_tokens=24)
    return {"ids": ids, "text": text, "base_text": base_text, "rendered": tok.decode(ids)}


def test_adapter_worker_matches_mlx_lm_generate(adapter_dir, reference):
    assert "(farense)" in reference["rendered"] and SYSTEM in reference["rendered"]
    assert reference["text"] != reference["base_text"], "the fixture adapter should change the output"
    with Worker(adapter=adapter_dir, model=False) as w:
        r = w.ready
        assert r["adapter"] == str(adapter_dir) and r["model"] == "models/tiny-mistral"
        assert r["max_tokens"] == 24 and r["max_tokens_cap"] == 64 and r["context_length"] == 512
        d = w.request("a1", prompt=PROMPT)  # defaults from metadata: 24 tokens, greedy
        assert d["type"] == "done", d
        assert d["usage"]["prompt_tokens"] == len(reference["ids"])
        assert d["text"] == reference["text"]
        assert d["usage"]["completion_tokens"] <= 24
        # The same conversation spelled out with the system message gives the same prompt.
        d2 = w.request(
            "a2", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
        )
        assert d2["text"] == reference["text"] and d2["usage"]["prompt_tokens"] == len(reference["ids"])
        # max_tokens_cap from metadata; max_seq_length from metadata is the context.
        d3 = w.request("a3", prompt=PROMPT, max_tokens=1000)
        assert d3["usage"]["completion_tokens"] <= 64
        e = w.request("a4", prompt="Farense " * 600)
        assert e["type"] == "error" and e["code"] == "too_long"


def test_model_flag_overrides_base_model(adapter_dir, reference):
    with Worker(adapter=adapter_dir, model=TINY) as w:
        assert w.ready["model"] == str(TINY)
        assert w.request("b1", prompt=PROMPT)["text"] == reference["text"]


def test_bad_metadata_is_a_clear_startup_error(tmp_path, adapter_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (bad / name).write_bytes((adapter_dir / name).read_bytes())
    meta = json.loads((adapter_dir / "metadata.json").read_text())
    (bad / "metadata.json").write_text(json.dumps({**meta, "format": 99}))
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--adapter", str(bad)],
        cwd=ROOT,
        input=b"",
        capture_output=True,
        env=worker_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and b"unsupported format 99" in proc.stderr and proc.stdout == b""
    (bad / "metadata.json").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--adapter", str(bad)],
        cwd=ROOT,
        input=b"",
        capture_output=True,
        env=worker_env(),
        timeout=60,
    )
    assert proc.returncode == 2 and b"metadata.json: missing" in proc.stderr


def test_cli_with_the_adapter(adapter_dir, reference):
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", PROMPT, "--adapter", str(adapter_dir)],
        cwd=ROOT,
        capture_output=True,
        env=worker_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    result = json.loads(proc.stdout)
    assert result["text"] == reference["text"] and result["adapter"] == str(adapter_dir)
