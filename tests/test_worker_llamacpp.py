"""python -m worker --engine llamacpp: what only this engine has (the protocol itself is
tests/test_worker.py's, run against both engines): a missing llama.cpp, GGUF or a GGUF whose
vocabulary is not the model folder's tokenizer exits 2 saying why; the base pin holds; an
adapter's fused GGUF is served with the adapter's metadata (system prompt, names)."""

import json
import shutil
import subprocess

import pytest
from helpers_train import PY, ROOT, TINY, env_for, ok, prepare_data, run_dir, run_train, write_config

from core import llamacpp


def worker(base, *args, **env):
    return subprocess.run(
        [PY, "-m", "worker", "--engine", "llamacpp", *map(str, args)],
        cwd=ROOT,
        input=b'{"id":"a","prompt":"Ol\\u00e1","max_tokens":4}\n',
        capture_output=True,
        env=env_for(base, **env),
        timeout=300,
    )


def test_without_llamacpp_it_exits_2_saying_how_to_install_it(tmp_path):
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = worker(
        tmp_path, "--model", TINY, "--gguf", tmp_path / "x.gguf", PYTHONPATH=str(tmp_path / "shadow")
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", err[-2000:]
    assert "make llamacpp" in err, err[-2000:]


needs_llamacpp = pytest.mark.skipif(not llamacpp.installed(), reason=llamacpp.INSTALL_HINT)


@needs_llamacpp
def test_a_missing_gguf_or_another_models_vocabulary_exits_2(tmp_path, tiny_gguf):
    proc = worker(tmp_path, "--model", TINY)
    assert proc.returncode == 2 and b"make fuse NAME=" in proc.stderr, proc.stderr[-2000:]
    other = tmp_path / "other"  # the tiny model with two pieces of its vocabulary swapped
    shutil.copytree(TINY, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "▁Faro", "▁clube"
    assert a in vocab and b in vocab
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    proc = worker(tmp_path, "--model", other, "--gguf", tiny_gguf[0])
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "differs from the model's tokenizer" in err and "▁Faro" in err, err[
        -2000:
    ]


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, tiny_model):
    """A 2-step adapter on a copy of the tiny model, fused (its GGUF written by make fuse)."""
    base = tmp_path_factory.mktemp("llamacpp_run")
    model = base / "tiny-copy"
    shutil.copytree(TINY, model)
    config = write_config(base / "c.yaml", model=str(model), iters=2, steps_per_eval=2, save_every=2)
    ok(run_train(base, config, "run", prepare_data(base / "data")))
    run = run_dir(base, "run")
    ok(
        subprocess.run(
            [PY, "-m", "train.fuse", "--name", "run"],
            cwd=ROOT,
            env=env_for(base),
            capture_output=True,
            text=True,
            timeout=600,
        )
    )
    assert (run / "fused" / "ggml-model-f16.gguf").is_file()
    return base, model, run


@needs_llamacpp
def test_an_adapters_fused_gguf_is_served_with_its_metadata_and_base_pin(fused_run):
    """--adapter models/NAME: the fused GGUF by default, the adapter's names in ready and done;
    a changed base is refused as on the mlx engine."""
    base, model, run = fused_run
    proc = worker(base, "--adapter", run)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    ready, done = lines[0], next(m for m in lines if m.get("id") == "a")
    assert ready["type"] == "ready" and "llama.cpp" in ready["version"] and ready["adapter"] == str(run)
    assert done["type"] == "done" and done["adapter"] == str(run) and done["usage"]["completion_tokens"] >= 1
    meta = json.loads((run / "metadata.json").read_text())
    assert done["usage"]["prompt_tokens"] > len(meta["system_prompt"]) // 8  # the system prompt is in

    import mlx.core as mx

    f = next(model.glob("*.safetensors"))
    weights = dict(mx.load(str(f)))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    proc = worker(base, "--adapter", run)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "is not the one the adapter" in err, err[-2000:]


def test_the_kv_cache_holds_every_sequences_context_within_the_memory_budget(tmp_path, monkeypatch):
    """Pure sizing: context x --max-batch cells when the budget holds them beside the weights;
    else as many as fit (whole 256-cell steps), never less than one context, and a warning that
    says what to change. Mistral v0.3's shape: 128 KiB of float16 K and V per token."""
    from core import memory
    from worker.engine_llamacpp import kv_cells

    config = {
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
    }  # fmt: skip
    gguf = tmp_path / "w.gguf"
    gguf.write_bytes(b"\0" * 1000)
    per_token = 2 * 32 * 8 * 128 * 2
    monkeypatch.setattr(memory, "budget", lambda fraction: (1000 + 4096 * 8 * per_token, "given"))
    assert kv_cells(config, 4096, 8, gguf, 0.8) == (4096 * 8, None)
    monkeypatch.setattr(memory, "budget", lambda fraction: (1000 + 10_000 * per_token, "a small budget"))
    cells, why = kv_cells(config, 4096, 8, gguf, 0.8)
    assert cells == 9984  # 10,000 rounded down to 256s
    assert "not 32768" in why and "a small budget" in why and "--max-batch" in why
    monkeypatch.setattr(memory, "budget", lambda fraction: (500, "nothing"))
    assert kv_cells(config, 4096, 8, gguf, 0.8)[0] == 4096
