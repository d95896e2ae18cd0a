"""What training claims, on a real LLM: SmolLM2-135M-Instruct (make base-model) with a small
fixed budget of steps. The validation loss falls and the evaluation shows the tuned model closer
to the data's answers than the base; kill -9 in the middle of a run resumes to the same losses
and weights; QLoRA on the 4-bit sibling trains and the real worker serves base + adapter.

One trained adapter serves every test here (helpers_train.smollm_reference_run, once per
session). The tiny random model keeps the protocol, resume and fault tests where language does
not matter (test_train.py, test_real_model_path.py)."""

import json
import os
import signal
import subprocess

import pytest
from helpers_train import (
    ROOT,
    SMOLLM_CONFIG,
    env_for,
    load_weights,
    max_abs_diff,
    metrics,
    ok,
    run_dir,
    run_module,
    run_train,
    shared_base,
    smollm_reference_run,
    train_cmd,
    trained,
    write_config,
)
from test_train import assert_same_losses, watch_until
from worker_harness import Worker


@pytest.fixture(scope="session")
def shared(tmp_path_factory, smollm_model):
    return shared_base(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm_run(shared):
    """(base folder, run folder) of the session's SmolLM2 run (16 LoRA steps)."""
    return shared / "smollm", smollm_reference_run(shared)


def val_losses(base, name):
    return [(r["step"], r["val_loss"]) for r in metrics(base, name) if r["val_loss"] is not None]


# --------------------------------------------------------------------------- it learns


def test_validation_loss_falls_by_half_in_16_steps(smollm_run):
    base, run = smollm_run
    vals = val_losses(base, "run")
    assert [s for s, _ in vals] == [0, 8, 16]
    (_, first), (_, last) = vals[0], vals[-1]
    print(f"\nSMOLLM-LEARN validation loss {first!r} -> {last!r}")
    # Measured in 3 fresh sessions (pytest, then tests/repeat.py -n 2): 2.8268 -> 1.3242 (ratio
    # 0.47), the same bits each time. SmolLM2 already speaks; the fall is the data's answers.
    assert last <= 0.6 * first, f"validation loss {first:.4f} -> {last:.4f}"
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["best_val_loss"] == min(v for _, v in vals) and meta["steps"] == 16


def test_the_evaluation_shows_the_tuned_model_nearer_the_answers_than_the_base(smollm_run):
    """make eval's measures, base vs tuned under the same prompt, on the first 4 validation
    questions (and of each evaluation set; no general text: test_eval_fuse covers that part)."""
    base, run = smollm_run
    args = ["--name", "run", "--limit", 4, "--max-tokens", 32, "--general-text", base / "none"]
    proc = ok(run_module(base, "train.evaluate", *args))
    report = json.loads((run / "eval.json").read_text())
    b, t = report["base"], report["fine_tuned"]
    print("\nSMOLLM-EVAL", {k: (b[k], t[k]) for k in ("loss", "token_f1", "chrf")})
    # Measured in 3 fresh sessions: loss 2.81 -> 1.40, token F1 0.17 -> 0.40, chrF 17.8 -> 29.0,
    # the same bits each time. (16 steps do not yet put the facts in the answers: key facts stay
    # 0 on both sides here; make demo's longer recipe is where they are measured.)
    assert t["loss"] <= 0.7 * b["loss"], proc.stdout
    assert t["token_f1"] >= b["token_f1"] + 0.1, proc.stdout
    assert t["chrf"] >= b["chrf"] + 5, proc.stdout


# --------------------------------------------------------------------------- replay


def general_text_perplexity(model_dir, adapter=None):
    """make eval's forgetting measure (data/general/, 256-token windows), in process."""
    from mlx_lm import load

    from train import batches, eval_model

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    texts = [text for _, text in eval_model.general_texts()]
    examples = batches.text_windows(tokenizer, texts, eval_model.TEXT_CHUNK)
    return eval_model.text_perplexity(model, examples)["perplexity"]


def test_replay_text_holds_the_general_text_perplexity_near_the_base(shared, smollm_run, smollm_model):
    """The same 16 steps with a window of data/replay/ in every step (a KL to the base, weight
    1, the demo's replay): the general-text perplexity stays nearer the base's than without,
    and the run still learns."""
    _, plain = smollm_run
    config = write_config(
        shared / "smollm-replay.yaml", **SMOLLM_CONFIG, replay={"data": "data/replay", "weight": 1.0}
    )
    replayed, proc = trained(shared / "smollm-replay", "run", config, shared / "data")
    base = general_text_perplexity(smollm_model)
    without, with_replay = (general_text_perplexity(smollm_model, run) for run in (plain, replayed))
    vals = val_losses(shared / "smollm-replay", "run")
    print(
        f"\nSMOLLM-REPLAY general-text perplexity: base {base:.2f}, tuned {without:.2f}, with replay "
        f"{with_replay:.2f}; validation losses with replay {vals}"
    )
    # Measured (2026-12-07): base 50.23, tuned 62.94 (+25%), with replay 52.34 (+4.2%); the
    # validation loss 2.83 -> 1.42 with replay against 1.32 without: it learns, a little more
    # slowly (with replay batches at weight 4, 2026-12-06: 53.86, +7.2%, and 1.77).
    assert with_replay < without and with_replay <= 1.15 * base
    assert vals[-1][1] <= 0.7 * vals[0][1], vals


# --------------------------------------------------------------------------- kill -9, resume


def test_kill_9_mid_interval_then_rerun_matches_the_uninterrupted_run(shared, smollm_run, tmp_path):
    """SIGKILL after the step-4 checkpoint, before step 8's: the rerun resumes from step 4 and
    ends with the reference's validation losses and adapters (best/, last/, the bundle)."""
    ref_base, reference = smollm_run
    config = shared / "smollm.yaml"
    proc = subprocess.Popen(
        train_cmd(config, "run", shared / "data"),
        cwd=ROOT,
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # step 6 logged: step 4's checkpoint is on disk (written before step 5 began), step 8's not yet
    reached = watch_until(proc, tmp_path / "logs" / "run" / "metrics.jsonl", 6)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-3000:]
    out = run_dir(tmp_path, "run")
    assert not (out / "metadata.json").exists()
    assert 6 <= reached < 8, f"killed at step {reached}"

    again = ok(run_train(tmp_path, config, "run", shared / "data"))
    assert "resuming from" in again.stderr and "step_0000004" in again.stderr, again.stderr[-3000:]
    ref_m, got_m = metrics(ref_base, "run"), metrics(tmp_path, "run")
    assert [r["step"] for r in got_m] == [r["step"] for r in ref_m]  # nothing logged twice
    assert_same_losses(ref_m, got_m)  # every step's losses, within 1e-6 (measured: equal)
    # measured in 3 fresh sessions (killed at step 6 each time): max |diff| 0.0 for all three
    for name in ("adapters.safetensors", "best/adapters.safetensors", "last/adapters.safetensors"):
        diff = max_abs_diff(load_weights(reference / name), load_weights(out / name))
        print(f"\nSMOLLM-RESUME killed at step {reached}: {name} max |diff| {diff!r}")
        assert diff <= 1e-6, name


# --------------------------------------------------------------------------- QLoRA on the 4-bit sibling

# On a CPU mlx's quantized matmul is ~30x slower than its float one: 3 steps of 2 examples on
# the top 2 blocks, one validation batch, is what fits make test's budget.
QLORA = {
    "model": "models/smollm2-135m-instruct-4bit",
    "num_layers": 2,
    "lora_parameters": {"rank": 8, "scale": 10.0, "dropout": 0.0},
    "batch_size": 2,
    "iters": 3,
    "learning_rate": 1e-3,
    "lr_schedule": None,
    "steps_per_eval": 3,
    "save_every": 3,
    "val_batches": 1,
}


def test_qlora_on_the_4bit_sibling_trains_and_the_worker_serves_it(shared, smollm_model_4bit):
    config = write_config(shared / "smollm-qlora.yaml", **QLORA)
    run, stderr = trained(shared / "smollm-qlora", "q", config, shared / "data")
    assert "QLoRA" in stderr
    vals = val_losses(shared / "smollm-qlora", "q")
    assert [s for s, _ in vals] == [0, 3]
    print(f"\nSMOLLM-QLORA validation loss {vals[0][1]!r} -> {vals[1][1]!r}")
    # Measured in 3 fresh sessions: 2.628 -> 2.031 on the same validation batch, the same bits.
    assert vals[1][1] <= vals[0][1] - 0.3, vals
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["base_model"].endswith("smollm2-135m-instruct-4bit")
    with Worker("--context-length", "1024", model=smollm_model_4bit, adapter=run) as w:
        assert w.ready["adapter"] == str(run)
        question = "Em que ano foi fundado o Sporting Clube Farense?"
        done = w.request("q1", messages=[{"role": "user", "content": question}], max_tokens=24, timeout=300)
    print(f"\nSMOLLM-QLORA worker: {done['text']!r}")
    assert done["type"] == "done" and done["usage"]["completion_tokens"] >= 1 and done["text"].strip()
    assert "<|im_end|>" not in done["text"]
