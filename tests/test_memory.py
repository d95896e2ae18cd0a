"""core/memory.py: the memory model against mlx's measured peaks, the budget, the probe's
decisions, the resume check and the worker's limits.

The measurements run in a subprocess (this file run as a script): mlx-lm's grad_checkpoint
patches the block class for the whole process, and a fresh process has a clean peak.
"""

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core import memory  # noqa: E402

TINY = ROOT / "models" / "tiny-mistral"
TINY_4BIT = ROOT / "models" / "tiny-mistral-4bit"
BENCH = ROOT / "models" / "bench-mistral"
TOLERANCE = 0.25

# mlx-community/Mistral-7B-Instruct-v0.3-4bit (docs/MEMORY.md)
MISTRAL_7B_4BIT = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=14336,
    vocab_size=32768,
    quantization={"bits": 4, "group_size": 64},
    torch_dtype="float16",
)
GiB = 1 << 30


# --------------------------------------------------------------------------- measuring (subprocess)


def measure_training(model_path, batch, seq_len, grad_checkpoint, num_layers, rank=8, replay=0):
    """One LoRA training step (forward, backward, AdamW update) as train.py runs it; returns
    the loaded weights' bytes and mlx's peak. replay: a replay batch's step instead (the KL to
    the base model on raw-text windows, train/loss.py ReplayLoss)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.trainer import grad_checkpoint as checkpoint
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import train  # noqa: F401  (fast BLAS before mlx)
    from train.loss import ReplayLoss, TargetLoss

    model, _ = load(str(model_path))
    mx.eval(model.parameters())
    weights = mx.get_active_memory()
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": rank, "scale": 20.0, "dropout": 0.0})
    if grad_checkpoint:
        checkpoint(model.layers[0])
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    tokens = mx.random.randint(5, model.args.vocab_size, (batch, seq_len + 1)).astype(mx.int32)
    lengths = mx.array([[1, seq_len]] * batch, dtype=mx.int32)
    loss = ReplayLoss(TargetLoss(model), 1.0) if replay else TargetLoss(model)
    loss_and_grad = nn.value_and_grad(model, loss.mean_loss)
    model.train()
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    (loss, _), grads = loss_and_grad(model, tokens, lengths)
    opt.update(model, grads)
    mx.eval(loss, grads, model.parameters(), opt.state)
    return {"weights": int(weights), "peak": int(mx.get_peak_memory()), "rss_peak": rss_high_water()}


def rss_high_water():
    """This process's RSS high-water mark, bytes. On Linux VmHWM (this program's own): ru_maxrss
    keeps the forking parent's across exec, so a child of a pytest that has grown to 2 GB
    reported 2 GB (a fresh clone's full `make test`, 2026-12-05)."""
    hwm = memory.high_water_mark()
    if hwm is not None:
        return hwm
    return memory.maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF))


def measure_kv(model_path, n_tokens):
    """Bytes of mlx-lm's KV cache after a prompt of n_tokens."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    import train  # noqa: F401

    model, _ = load(str(model_path))
    cache = make_prompt_cache(model)
    model(mx.array([[7] * n_tokens]), cache=cache)
    mx.eval([c.state for c in cache])
    return {"kv": int(sum(c.nbytes for c in cache))}


def run_measure(*args, timeout=900):
    proc = subprocess.run(
        [sys.executable, __file__, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_4bit(tmp_path_factory):
    """models/tiny-mistral-4bit when `make tiny-model` built it, else a 4-bit conversion here."""
    if (TINY_4BIT / "config.json").exists():
        return TINY_4BIT
    out = tmp_path_factory.mktemp("q") / "tiny-4bit"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "convert",
            "--hf-path",
            str(TINY),
            "-q",
            "--q-group-size",
            "32",
            "--mlx-path",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _check(model_path, batch, seq_len, gc, num_layers):
    shape = memory.shape_from_config(memory.read_config(model_path))
    got = run_measure("train", model_path, batch, seq_len, int(gc), num_layers)
    predicted = memory.training_peak(shape, memory.TrainSettings(num_layers=num_layers), batch, seq_len, gc)
    error = predicted["total"] / got["peak"] - 1
    print(
        f"\nMEMORY {json.dumps(dict(model=Path(model_path).name, batch=batch, seq_len=seq_len, grad_checkpoint=gc, num_layers=num_layers, measured=got['peak'], predicted=predicted['total'], error_pct=round(100 * error, 1)))}"
    )
    assert abs(predicted["weights"] - got["weights"]) <= 0.01 * got["weights"] + 4096, (predicted, got)
    assert abs(error) < TOLERANCE, (predicted, got)


# --------------------------------------------------------------------------- against measured peaks


@pytest.mark.parametrize(
    "batch,seq_len,gc,num_layers",
    [(1, 512, False, 4), (4, 256, False, 2), (2, 512, True, 4), (1, 1024, True, 4)],
)
def test_training_peak_tiny(batch, seq_len, gc, num_layers):
    _check(TINY, batch, seq_len, gc, num_layers)


@pytest.mark.parametrize("batch,seq_len,gc", [(1, 512, False), (2, 256, True)])
def test_training_peak_tiny_4bit(tiny_4bit, batch, seq_len, gc):
    shape = memory.shape_from_config(memory.read_config(tiny_4bit))
    assert shape.bits == 4 and shape.group_size in (32, 64)
    _check(tiny_4bit, batch, seq_len, gc, 4)


@pytest.mark.slow
@pytest.mark.skipif(
    not (BENCH / "config.json").exists(), reason="models/bench-mistral not built (make bench-model)"
)
@pytest.mark.parametrize("batch,seq_len,gc,num_layers", [(1, 256, False, 16), (2, 512, True, 8)])
def test_training_peak_bench(batch, seq_len, gc, num_layers):
    _check(BENCH, batch, seq_len, gc, num_layers)


def test_kv_bytes_per_token_matches_mlx_lm_cache():
    shape = memory.shape_from_config(memory.read_config(TINY))
    got = run_measure("kv", TINY, 300)["kv"]
    allocated = -(-300 // memory.KV_STEP) * memory.KV_STEP  # caches grow 256 tokens at a time
    assert got == memory.kv_bytes_per_token(shape) * allocated


# --------------------------------------------------------------------------- the 7B numbers (docs/MEMORY.md)


def test_mistral_7b_4bit_numbers_in_the_docs():
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    assert s.scale_bytes == 2 and s.bits == 4
    assert memory.weight_bytes(s) == pytest.approx(4.08e9, rel=0.01)  # the repo's safetensors: 4.08 GB
    assert memory.kv_bytes_per_token(s) == 128 * 1024  # issue 12's 128 KiB
    state = memory.training_state_bytes(s)
    # rank 8 x (in + out) of q, k, v, o, gate, up, down, in 16 blocks, float32: 41.9 MB
    per_block = 8 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert state["parameters"] == 16 * per_block * 4 == 41_943_040
    assert state["optimizer"] == 2 * state["parameters"] == 2 * state["gradients"]
    doc = (ROOT / "docs" / "MEMORY.md").read_text(encoding="utf-8")
    assert f"{memory.weight_bytes(s) / 1e9:.2f} GB" in doc
    peak = memory.training_peak(s, memory.TrainSettings(), 1, 2048, True)["total"]
    assert f"{peak / 1e9:.2f} GB" in doc


# --------------------------------------------------------------------------- pure logic


def test_quantization_details_from_the_config():
    cfg = dict(MISTRAL_7B_4BIT, quantization={"bits": 8, "group_size": 32})
    s = memory.shape_from_config(cfg, scales_dtype="float32")
    assert (s.bits, s.group_size, s.scale_bytes, s.dtype_bytes) == (8, 32, 4, 2)
    # one 4096 x 4096 matrix: a byte per weight, a float32 scale and bias per 32 weights
    assert memory._matrix_bytes(s, 4096, 4096) == 4096 * 4096 + 2 * 4096 * 128 * 4
    plain = memory.shape_from_config({k: v for k, v in cfg.items() if k != "quantization"})
    assert plain.bits is None and memory.weight_bytes(plain) > 1.5 * memory.weight_bytes(s)


def test_checkpointing_and_shorter_sequences_need_less():
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    st = memory.TrainSettings()
    full = memory.activation_bytes_per_token(s, 2048, 16, False)
    assert memory.activation_bytes_per_token(s, 2048, 16, True) < full / 2
    assert memory.activation_bytes_per_token(s, 512, 16, False) < full
    assert memory.training_peak(s, st, 2, 1024)["total"] > memory.training_peak(s, st, 1, 1024)["total"]


def test_a_run_with_replay_text_is_planned_by_its_larger_step():
    """A replay window (128 tokens) holds the base's logits too: on the 7B model it is smaller
    than a 1,024-token conversation, so nothing changes; next to 64-token conversations it is
    the larger step. Batched like the conversations (per_step 0) the windows set the batch;
    one in every step (per_step 1, the default) is a pass of its own after the batch's, so it
    counts once, not once a row. The config's replay.data turns it on."""
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    st = memory.TrainSettings()
    per_step, batched = (memory.TrainSettings(replay_window=128, replay_per_step=k) for k in (1, 0))
    assert memory.TrainSettings.from_cfg({"replay": {"data": "data/replay"}}) == per_step
    assert memory.TrainSettings.from_cfg({"replay": {"data": "data/replay", "per_step": 0}}) == batched
    assert memory.TrainSettings.from_cfg({"replay": {"data": None}}) == st
    for replay in (per_step, batched):
        assert memory.training_peak(s, replay, 4, 1024) == memory.training_peak(s, st, 4, 1024)
    window = 128 * memory.replay_bytes_per_token(s, 128, 16)
    chat = 64 * memory.activation_bytes_per_token(s, 64, 16)
    assert chat < window < 4 * chat
    assert memory.training_peak(s, batched, 4, 64)["activations"] == 4 * window
    assert memory.training_peak(s, per_step, 4, 64)["activations"] == 4 * chat
    assert memory.training_peak(s, per_step, 1, 64)["activations"] == window
    budget = memory.training_peak(s, st, 8, 64)["total"]
    assert memory.largest_batch(s, st, 64, budget) == memory.largest_batch(s, per_step, 64, budget) == 8
    assert memory.largest_batch(s, batched, 64, budget) == 8 * chat // window
    # a budget that holds a conversation but not the window: per-step replay fits no batch
    small = memory.training_peak(s, st, 0, 64)["total"] + (chat + window) // 2
    assert memory.largest_batch(s, st, 64, small) >= 1 and memory.largest_batch(s, per_step, 64, small) == 0


def test_budget_is_the_smaller_of_device_share_and_available_now():
    b, why = memory.budget(0.8, held=1 * GiB, total=16 * GiB, available=20 * GiB)
    assert b == int(0.8 * 16 * GiB) and "0.8 x" in why
    b, why = memory.budget(0.8, held=1 * GiB, total=16 * GiB, available=3 * GiB)
    assert b == 4 * GiB and "available now" in why


def test_does_not_fit_names_settings_that_fit():
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    msg = memory.does_not_fit_message(s, memory.TrainSettings(), int(6.5e9), 4096, "budget 6.5 GB")
    found = re.findall(r"make train MAX_SEQ_LENGTH=(\d+) BATCH_SIZE=(\d+)( GRAD_CHECKPOINT=1)?", msg)
    assert found, msg
    for L, b, gc in found:
        assert memory.training_peak(s, memory.TrainSettings(), int(b), int(L), bool(gc))["total"] <= 6.5e9
        assert memory.training_peak(s, memory.TrainSettings(), int(b) + 1, int(L), bool(gc))["total"] > 6.5e9
    assert "nothing fits" in memory.does_not_fit_message(s, memory.TrainSettings(), int(4e9), 2048, "x")


def test_resume_check_says_when_the_recorded_batch_no_longer_fits(monkeypatch):
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    st = memory.TrainSettings()
    monkeypatch.setattr(memory, "device_memory", lambda: (int(10.7e9), "test"))
    monkeypatch.setattr(memory, "available_memory", lambda: int(20e9))
    memory.check_resume(s, st, 1, 1024, True, 0.8, log=lambda *_: None)  # fits: no error
    monkeypatch.setattr(memory, "available_memory", lambda: int(7e9))  # a worker took some
    with pytest.raises(memory.DoesNotFit) as e:
        memory.check_resume(s, st, 4, 1024, False, 0.8, log=lambda *_: None)
    text = str(e.value)
    assert "batch_size 4" in text and "no longer fits" in text and "FRESH=1 BATCH_SIZE=" in text


def test_worker_limits_for_7b_on_a_16gb_mac():
    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    budget = int(0.8 * 10.7e9)
    lim = memory.worker_limits(s, budget, 2048)
    assert 1 <= lim["max_batch"] < 32 and lim["full_context_fits"]
    assert lim["predicted_peak_bytes"] <= budget
    # 32 x 2048 tokens of KV alone would be 8 GiB: the old default did not fit
    assert 32 * 2048 * memory.kv_bytes_per_token(s) == 8 * GiB
    given = memory.worker_limits(s, budget, 2048, max_batch=3, prefix_cache_bytes=0)
    assert (given["max_batch"], given["prefix_cache_bytes"]) == (3, 0)
    tight = memory.worker_limits(s, int(4.56e9), 2048)  # a training run holds 4 GB
    assert tight["max_batch"] == 1 and tight["context_capped_from"] == 2048
    assert 256 <= tight["context_length"] < 2048 and tight["predicted_peak_bytes"] <= int(4.56e9)
    assert tight["prefix_cache_bytes"] == 0
    assert not memory.worker_limits(s, int(4e9), 2048)["full_context_fits"]  # below the weights
    # docs/MEMORY.md's table of the default budget, as the plan prints it
    doc = (ROOT / "docs" / "MEMORY.md").read_text(encoding="utf-8")
    for b in (budget, int(7.0e9), int(6.0e9), int(4.56e9)):
        lim = memory.worker_limits(s, b, 2048)
        capped = f", context capped at {lim['context_length']}" if lim["context_capped_from"] else ""
        batch = f"| {lim['max_batch']}{capped} | {lim['predicted_peak_bytes'] / 1e9:.2f} GB |"
        assert batch in doc, (b, batch)
        assert lim["prefix_cache_bytes"] == 0 or f"| {lim['prefix_cache_bytes'] / 1e9:.2f} GB {batch}" in doc


def test_the_prefill_chunk_counts_the_prompts_mlx_lm_prefills_together():
    """mlx-lm prefills min(8, max_batch) prompts at a time (worker/engine.py): the plan counts
    that many, never fewer; for the 7B over these budgets, at most one more (the plan stops
    removing prompts where one fewer would let a larger batch in)."""
    from core.memory_model import prefill_bytes_per_token
    from core.worker_budget import PREFILL_BATCH, _kv_with_growth, prompts

    s = memory.shape_from_config(MISTRAL_7B_4BIT)
    seen = set()
    for budget in [int(g * 1e8) for g in range(44, 200, 3)]:
        for given in (None, 1, 3, 12):
            lim = memory.worker_limits(s, budget, 2048, max_batch=given)
            ctx, step = lim["context_length"], lim["prefill_step_size"]
            fixed = (
                lim["weights_bytes"] + lim["prefix_cache_bytes"] + lim["max_batch"] * _kv_with_growth(s, ctx)
            )
            chunk = (lim["predicted_peak_bytes"] - fixed) / (min(step, ctx) * prefill_bytes_per_token(s, ctx))
            counted = round(chunk)
            assert abs(chunk - counted) < 1e-6 and counted <= PREFILL_BATCH, (budget, given, lim)
            assert prompts(lim["max_batch"]) <= counted <= prompts(lim["max_batch"]) + 1, (budget, given, lim)
            if given:
                assert counted == prompts(given)
            seen.add(counted)
    assert {1, 3, PREFILL_BATCH} <= seen


def test_wired_limit_is_a_no_op_without_metal():
    import mlx.core as mx

    if mx.metal.is_available():
        pytest.skip("Metal: the wired limit is really set (checked by make check-backend)")
    assert memory.set_wired_limit() is None


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "train":
        out = measure_training(rest[0], int(rest[1]), int(rest[2]), rest[3] == "1", *map(int, rest[4:7]))
    else:
        out = measure_kv(rest[0], int(rest[1]))
    print(json.dumps(out))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's /proc")
def test_the_rss_high_water_mark_is_the_programs_own_not_its_forking_parents():
    """A child started by a 1 GiB process reports its own peak, not the parent's (ru_maxrss did)."""
    ballast = bytearray(1 << 30)
    ballast[:: 1 << 12] = b"\x01" * len(ballast[:: 1 << 12])  # every page resident
    code = "import sys; sys.path.insert(0, 'tests'); from test_memory import rss_high_water; print(rss_high_water())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) < (1 << 30) // 2, proc.stdout
    del ballast
