"""train/train.py on the tiny model, through real subprocesses: resume after kill -9, corrupt
checkpoints, refused resumes, non-finite losses, best/, the bundle mlx-lm loads (the demo: tests/test_demo.py)."""

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers_train import (
    PY,
    ROOT,
    SMALL_CONFIG,
    TINY,
    env_for,
    load_weights,
    max_abs_diff,
    metrics,
    ok,
    reference_run,
    run_dir,
    run_train,
    shared_base,
    train_cmd,
    write_config,
)

from train import batches, checkpoint
from train.inputs import add_question_noise


@pytest.fixture(scope="session")
def shared(tmp_path_factory, tiny_model):
    return shared_base(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(shared):
    """The uninterrupted small run every resume test compares against."""
    return reference_run(shared)


def copy_run(src_base, dst_base, name="run"):
    shutil.copytree(src_base / "models", dst_base / "models")
    shutil.copytree(src_base / "logs", dst_base / "logs")
    return run_dir(dst_base, name)


def losses_by_step(records):
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in records}


def assert_same_losses(a, b, steps=None):
    la, lb = losses_by_step(a), losses_by_step(b)
    shared_steps = sorted(set(la) & set(lb)) if steps is None else steps
    assert shared_steps, "no shared steps to compare"
    for s in shared_steps:
        for x, y, what in zip(la[s], lb[s], ("train_loss", "val_loss")):
            assert (x is None) == (y is None), f"step {s}: {what} logged in one run only"
            if x is not None:
                assert abs(x - y) <= 1e-6 * max(1.0, abs(x)), f"step {s}: {what} {x} != {y}"
    return shared_steps


# --------------------------------------------------------------------------- resume


def watch_until(proc, metrics_file, step):
    """Wait until the run has logged `step` (or ended); returns the last step seen."""
    deadline, reached = time.monotonic() + 300, 0
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics_file.exists():
            steps = [
                json.loads(line)["step"]
                for line in metrics_file.read_text().splitlines()
                if line.endswith("}")
            ]
            reached = max(steps, default=0)
            if reached >= step:
                break
        time.sleep(0.02)
    return reached


def test_kill_9_then_rerun_matches_uninterrupted_run(shared, reference, tmp_path):
    cfg = shared / "small.yaml"
    seed = random.randrange(1 << 30)
    kill_at = random.Random(seed).randint(7, 22)  # after the first checkpoint (step 5)
    cmd = train_cmd(cfg, "run", shared / "data")
    # A small pause per step (the loop's test hook) so the kill lands mid-run; it does not
    # change any number.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env_for(tmp_path, TRAIN_STEP_DELAY_S=0.1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    reached = watch_until(proc, tmp_path / "logs" / "run" / "metrics.jsonl", kill_at)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, (
        f"the run ended before the kill (seed {seed}):\n{stderr[-3000:]}"
    )
    out = run_dir(tmp_path, "run")
    assert not (out / "metadata.json").exists()
    assert any(p.name.startswith("step_") for p in (out / "checkpoints").iterdir())

    again = ok(run_train(tmp_path, cfg, "run", shared / "data"))
    assert "resuming from" in again.stderr, again.stderr
    ref_w = load_weights(reference / "adapters.safetensors")
    got_w = load_weights(out / "adapters.safetensors")
    assert max_abs_diff(ref_w, got_w) <= 1e-5, f"kill at step {reached} (seed {seed})"
    assert (
        max_abs_diff(
            load_weights(reference / "best" / "adapters.safetensors"),
            load_weights(out / "best" / "adapters.safetensors"),
        )
        <= 1e-5
    )
    assert (
        max_abs_diff(
            load_weights(reference / "last" / "adapters.safetensors"),
            load_weights(out / "last" / "adapters.safetensors"),
        )
        <= 1e-5
    )
    ref_m, got_m = metrics(shared / "ref", "run"), metrics(tmp_path, "run")
    assert [r["step"] for r in got_m] == [r["step"] for r in ref_m]  # nothing logged twice
    # the token counters resume too; the trained tokens are the answers' (prompts masked)
    counters = lambda m: [(r["tokens_seen"], r["trained_tokens"]) for r in m]
    assert counters(got_m) == counters(ref_m)
    assert all(0 < r["trained_tokens"] < r["tokens_seen"] for r in ref_m if r["step"])
    assert len(assert_same_losses(ref_m, got_m)) == 31


def ctrl_c_at(cfg, data, base, step):
    """Start the run "run" under `base`, press Ctrl-C once it has logged `step` (a small pause
    per step, the loop's test hook, lets it land mid-run); returns its stderr, exit 130 checked."""
    proc = subprocess.Popen(
        train_cmd(cfg, "run", data),
        cwd=ROOT,
        env=env_for(base, TRAIN_STEP_DELAY_S=0.1),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watch_until(proc, base / "logs" / "run" / "metrics.jsonl", step)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, stderr[-3000:]
    return stderr


def test_ctrl_c_saves_the_current_step_and_the_rerun_matches(shared, reference, tmp_path):
    cfg = shared / "small.yaml"
    stderr = ctrl_c_at(cfg, shared / "data", tmp_path, 8)
    step = int(stderr.split("interrupted at step ")[1].split(";")[0])
    assert "checkpoint saved" in stderr
    newest = sorted((run_dir(tmp_path, "run") / "checkpoints").glob("step_*"))[-1]
    assert newest.name == f"step_{step:07d}"
    checkpoint.verify(newest)

    again = ok(run_train(tmp_path, cfg, "run", shared / "data"))
    assert f"resuming from {newest} (step {step}/30" in again.stderr
    assert (
        max_abs_diff(
            load_weights(reference / "adapters.safetensors"),
            load_weights(run_dir(tmp_path, "run") / "adapters.safetensors"),
        )
        <= 1e-5
    )
    assert_same_losses(metrics(shared / "ref", "run"), metrics(tmp_path, "run"))


@pytest.mark.parametrize("per_step", [0, 2])
def test_a_run_with_replay_text_reports_its_kl_and_resumes_exactly(shared, tmp_path, per_step):
    """Replay (train/replay.py, the KL to the base on raw text) through the real loop, as batches
    of their own (per_step 0: steps of replay text only) or as two windows in every step's loss:
    its KL is reported, Ctrl-C then a rerun ends exactly where an uninterrupted run ends (the
    windows a step takes are a function of the step), and a changed replay text refuses the resume."""
    replay = {"data": str(ROOT / "data" / "replay"), "weight": 2.0, "per_step": per_step}
    cfg = write_config(tmp_path / "replay.yaml", replay=replay)
    ref = ok(run_train(tmp_path / "ref", cfg, "run", shared / "data"))
    assert "replay: " in ref.stderr and "replay KL" in ref.stderr, ref.stderr[-3000:]
    kept = "the base model's pass over each kept from its first step" in ref.stderr  # loss.keep_base
    assert kept == (per_step < 2), ref.stderr[-3000:]  # per_step 2: a step's pair never comes again
    ref_m = metrics(tmp_path / "ref", "run")
    kls = [r["replay_kl"] for r in ref_m if r.get("replay_kl") is not None]
    assert kls and all(math.isfinite(k) and k >= 0 for k in kls) and max(kls) > 0
    steps = [r for r in ref_m if r["tokens_per_s"] is not None]  # one report a step
    replay_only = [r["step"] for r in steps if r["train_loss"] is None]
    with_kl = [r["step"] for r in steps if r.get("replay_kl") is not None]
    if per_step:
        assert "2 in every step" in ref.stderr and not replay_only, ref.stderr[-3000:]
        assert with_kl == list(range(1, 31))
    else:
        assert replay_only and set(with_kl) == set(replay_only), (replay_only, with_kl)

    ctrl_c_at(cfg, shared / "data", tmp_path, 8)
    again = ok(run_train(tmp_path, cfg, "run", shared / "data"))
    assert "resuming from" in again.stderr, again.stderr[-3000:]
    got_w = load_weights(run_dir(tmp_path, "run") / "adapters.safetensors")
    assert (
        max_abs_diff(load_weights(run_dir(tmp_path / "ref", "run") / "adapters.safetensors"), got_w) <= 1e-5
    )
    got_m = metrics(tmp_path, "run")
    assert len(assert_same_losses(ref_m, got_m)) == 31
    for a, b in zip(ref_m, got_m):
        x, y = a.get("replay_kl"), b.get("replay_kl")
        assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-6 * max(1.0, x)), a["step"]

    changed = tmp_path / "replay-changed"
    shutil.copytree(ROOT / "data" / "replay", changed)
    (changed / "en.txt").write_text("Other text.\n", encoding="utf-8")
    cfg2 = write_config(tmp_path / "replay2.yaml", replay={**replay, "data": str(changed)})
    refused = run_train(tmp_path, cfg2, "run", shared / "data")
    assert refused.returncode == 2 and "replay data changed" in refused.stderr, refused.stderr[-3000:]


def test_the_frozen_blocks_kept_change_no_number_and_resume_exactly(shared, tmp_path):
    """The top 2 of the toy's 4 blocks adapted, the replay in every step, 30 steps (past one
    epoch: every batch met again): the frozen blocks' output kept (train/frozen_blocks.py), or
    not (TRAIN_KEEP_FROZEN_MB=0), gives the same losses and the same adapter file; Ctrl-C then a
    rerun, which starts with nothing kept, ends there too."""
    replay = {"data": str(ROOT / "data" / "replay"), "weight": 1.0, "per_step": 1}
    cfg = write_config(tmp_path / "top2.yaml", num_layers=2, replay=replay)
    kept = ok(run_train(tmp_path / "kept", cfg, "run", shared / "data"))
    assert "the 2 blocks below the adapted ones are frozen: their output" in kept.stderr, kept.stderr[-3000:]
    assert re.search(r"(\d+) batches per epoch", kept.stderr)[1] == "24"  # 30 steps: into the second
    env = env_for(tmp_path / "full", TRAIN_KEEP_FROZEN_MB=0)
    full = ok(run_train(tmp_path / "full", cfg, "run", shared / "data", env=env))
    assert "are frozen" not in full.stderr, full.stderr[-3000:]
    adapter = "adapters.safetensors"
    a, b = (run_dir(tmp_path / x, "run") / adapter for x in ("kept", "full"))
    assert a.read_bytes() == b.read_bytes()
    fields = ("step", "train_loss", "val_loss", "replay_kl")
    rows = [[[r.get(k) for k in fields] for r in metrics(tmp_path / x, "run")] for x in ("kept", "full")]
    assert rows[0] == rows[1] and len(rows[0]) == 31

    ctrl_c_at(cfg, shared / "data", tmp_path, 18)
    ok(run_train(tmp_path, cfg, "run", shared / "data"))
    assert (run_dir(tmp_path, "run") / adapter).read_bytes() == a.read_bytes()


def test_batch_size_auto_probes_the_replay_windows_too(shared, tmp_path):
    """With replay text, batch_size auto measures the step's replay windows (per_step: 1, the
    default) beside the longest conversations (their base-model logits are the larger pass
    when conversations are short)."""
    cfg = write_config(
        tmp_path / "auto.yaml",
        batch_size="auto",
        iters=2,
        save_every=2,
        steps_per_eval=2,
        replay={"data": str(ROOT / "data" / "replay"), "weight": 1.0},
    )
    proc = ok(run_train(tmp_path, cfg, "run", shared / "data", "--set", "auto_batch.max_batch_size=4"))
    line = next(x for x in proc.stderr.splitlines() if "batch_size auto: " in x)
    assert "or replay windows of 128, 1 a step" in line and "1: " in line, line


def test_replay_repeat_puts_each_window_in_an_epoch_that_many_times(shared, tmp_path):
    replay = {"data": str(ROOT / "data" / "replay"), "weight": 1.0}
    lines = {}
    for repeat in (1, 3):
        cfg = write_config(
            tmp_path / f"r{repeat}.yaml", iters=1, replay={**replay, "repeat": repeat, "per_step": 0}
        )
        proc = ok(run_train(tmp_path, cfg, f"run{repeat}", shared / "data"))
        lines[repeat] = [x for x in proc.stderr.splitlines() if "replay" in x and "windows" in x]
    once, thrice = lines[1], lines[3]
    assert ", each 3 times an epoch" in thrice[0] and "times an epoch" not in once[0]
    windows = int(re.search(r"replay: (\d+) windows", once[0])[1])
    assert f"+ {windows} replay windows" in once[1] and f"+ {3 * windows} replay windows" in thrice[1], thrice
    batches = [int(re.search(r"(\d+) batches per epoch", x[1])[1]) for x in (once, thrice)]
    size = SMALL_CONFIG["batch_size"]
    assert batches[1] - batches[0] == -(-3 * windows // size) - -(-windows // size), batches


def test_replay_settings_are_checked(shared, tmp_path):
    data = shared / "data"
    missing = write_config(tmp_path / "a.yaml", replay={"data": str(tmp_path / "nowhere"), "weight": 1.0})
    proc = run_train(tmp_path, missing, "run", data)
    assert (
        proc.returncode == 2 and f"replay.data {tmp_path / 'nowhere'}: no such file or folder" in proc.stderr
    )
    dora = write_config(tmp_path / "b.yaml", fine_tune_type="dora", replay={"data": "data/replay"})
    proc = run_train(tmp_path, dora, "run", data)
    assert proc.returncode == 2 and "replay.data needs fine_tune_type: lora" in proc.stderr
    proc = run_train(tmp_path, shared / "small.yaml", "run", data, "--set", "replay.weight=0")
    assert proc.returncode == 2 and "replay.weight must be a positive number, got 0" in proc.stderr
    both = write_config(tmp_path / "c.yaml", replay={"data": "data/replay", "per_step": 1, "repeat": 2})
    proc = run_train(tmp_path, both, "run", data)
    assert proc.returncode == 2 and "with replay.per_step (1) every step has replay windows" in proc.stderr


def test_corrupt_newest_checkpoint_falls_back_to_previous(shared, reference, tmp_path):
    out = copy_run(shared / "ref", tmp_path)
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    newest, previous = ckpts[-1], ckpts[-2]
    target = newest / "adapters.safetensors"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated
    (out / "metadata.json").unlink()

    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data"))
    assert f"checkpoint {newest.name} is unusable" in proc.stderr, proc.stderr
    assert "truncated or corrupt" in proc.stderr
    assert f"resuming from {previous}" in proc.stderr
    assert (
        max_abs_diff(
            load_weights(reference / "adapters.safetensors"), load_weights(out / "adapters.safetensors")
        )
        <= 1e-5
    )
    assert_same_losses(metrics(shared / "ref", "run"), metrics(tmp_path, "run"))


def test_resume_path_picks_an_older_checkpoint(shared, reference, tmp_path):
    out = copy_run(shared / "ref", tmp_path)
    older = out / "checkpoints" / "step_0000020"
    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--resume", older))
    assert f"resuming from {older} (step 20/30" in proc.stderr
    assert "removed checkpoint step_0000030 (newer than the one resumed)" in proc.stderr
    assert (
        max_abs_diff(
            load_weights(reference / "adapters.safetensors"), load_weights(out / "adapters.safetensors")
        )
        <= 1e-5
    )
    assert_same_losses(metrics(shared / "ref", "run"), metrics(tmp_path, "run"))
    # an explicit RESUME also continues past a changed config, naming the change
    older = out / "checkpoints" / "step_0000025"
    proc = ok(
        run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--resume", older, "--iters", "32")
    )
    assert "note: resuming" in proc.stderr and "iters: 30 -> 32" in proc.stderr
    assert json.loads((out / "metadata.json").read_text())["steps"] == 32


def test_flipped_byte_is_detected_by_the_manifest(shared, reference, tmp_path):
    out = copy_run(shared / "ref", tmp_path)
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    checkpoint.verify(newest)
    f = newest / "optimizer.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.verify(newest)
    found = checkpoint.latest_valid(out / "checkpoints", log=lambda m: None)
    assert found.path != newest and found.step < int(newest.name[5:])


def test_changed_data_or_config_is_refused_then_fresh_starts_over(shared, reference, tmp_path):
    out = copy_run(shared / "ref", tmp_path)
    before = (out / "adapters.safetensors").read_bytes()
    changed = tmp_path / "data2"
    shutil.copytree(shared / "data", changed)
    extra = {
        "messages": [
            {"role": "user", "content": "Quem é o presidente do Farense?"},
            {"role": "assistant", "content": "Consulte o site oficial do clube."},
        ]
    }
    with open(changed / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(extra, ensure_ascii=False) + "\n")

    proc = run_train(tmp_path, shared / "small.yaml", "run", changed)
    assert proc.returncode == 2, proc.stderr
    assert "train data changed" in proc.stderr and "96 -> 97 conversations" in proc.stderr
    assert "FRESH=1" in proc.stderr and "RESUME=" in proc.stderr

    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--learning-rate", "5e-4")
    assert proc.returncode == 2
    assert "learning_rate: 0.001 -> 0.0005" in proc.stderr, proc.stderr
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--set", "question_noise=2")
    assert proc.returncode == 2 and "question_noise: null -> 2" in proc.stderr, proc.stderr
    assert (out / "adapters.safetensors").read_bytes() == before  # nothing was touched

    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", changed, "--fresh", "--iters", "6"))
    assert "resuming" not in proc.stderr
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["steps"] == 6 and meta["data"]["train"]["count"] == 97
    assert [r["step"] for r in metrics(tmp_path, "run")][0] == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_0000006"


def test_question_noise_adds_training_examples_and_not_validation_ones(shared, tmp_path):
    """question_noise (train/question_noise.py) through the real loop: the run says how many
    noised questions it added to the 96 conversations, trains on all of them, and validates on
    the 11 it had; its metadata counts both."""
    noise = ("--iters", "2", "--set", "question_noise=2")
    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", *noise))
    line = next(x for x in proc.stderr.splitlines() if "question noise: " in x)
    added = int(line.split("question noise: ")[1].split()[0])
    assert 0 < added <= 192 and "added to 96 conversations" in line, line
    assert f"{96 + added} training / 11 validation examples" in proc.stderr, proc.stderr[-3000:]
    meta = json.loads((run_dir(tmp_path, "run") / "metadata.json").read_text())
    assert meta["data"]["train"]["count"] == 96 and meta["data"]["train"]["noised"] == added, meta["data"]

    # half of them as follow-ups: the same copies, some after another exchange; a new run, since
    # the examples differ from the finished one's (its resume is refused, naming the setting)
    follow = ("--set", "question_noise_follow_ups=0.5")
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", *noise, *follow)
    assert proc.returncode == 2 and "question_noise_follow_ups: null -> 0.5" in proc.stderr, proc.stderr
    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", *noise, *follow, "--fresh"))
    line = next(x for x in proc.stderr.splitlines() if "question noise: " in x)
    asked = int(line.split(", ")[-1].split()[0])
    assert f"question noise: {added} noised" in line and 0 < asked < added, line
    assert line.endswith(f"{asked} of them asked after another exchange of the data)"), line


def test_other_noised_copies_from_the_same_files_refuse_the_resume(shared, tmp_path):
    """The noised questions depend on the evaluation sets too (a copy that is a near copy of
    one is left out): a paraphrase added after a run changes its copies while train.jsonl and
    the config stay the same. The rerun is refused, not resumed on other examples."""
    data = tmp_path / "data"
    shutil.copytree(shared / "data", data)
    noise = ("--iters", "2", "--set", "question_noise=2")
    ok(run_train(tmp_path, shared / "small.yaml", "run", data, *noise))
    split = batches.read_split(data / "train.jsonl")
    cfg = {"question_noise": 2, "question_noise_follow_ups": 0.0, "seed": 0}
    noised = add_question_noise(split, data, cfg, log=lambda m: None)
    first = len(split.conversations)  # the copies come after the file's own conversations
    question = noised.conversations[first][-2]["content"]
    assert question not in {c[-2]["content"] for c in split.conversations}
    with open(data / "eval" / "paraphrases.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"question": question, "facts": ["Farense"]}, ensure_ascii=False) + "\n")
    proc = run_train(tmp_path, shared / "small.yaml", "run", data, *noise)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the examples encode to other tokens though the files and settings" in proc.stderr, proc.stderr
    assert "already complete" not in proc.stderr


def test_rerun_of_a_finished_run_changes_nothing(shared, reference, tmp_path):
    out = copy_run(shared / "ref", tmp_path)
    weights = (out / "adapters.safetensors").read_bytes()
    n_metrics = len(metrics(tmp_path, "run"))
    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data"))
    assert "already complete" in proc.stderr
    assert (out / "adapters.safetensors").read_bytes() == weights
    assert len(metrics(tmp_path, "run")) == n_metrics


# --------------------------------------------------------------------------- non-finite losses


@pytest.mark.parametrize("where", ["train:12", "val:15"])
def test_nan_loss_stops_the_run_and_never_becomes_best(shared, tmp_path, where):
    env = env_for(tmp_path, TRAIN_INJECT_NAN=where)
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--iters", "20", env=env)
    kind, step = where.split(":")
    assert proc.returncode == 3, proc.stderr
    what = "training loss" if kind == "train" else "validation loss"
    assert f"the {what} is nan at step {step}" in proc.stderr, proc.stderr
    assert "best/ holds step 10" in proc.stderr
    out = run_dir(tmp_path, "run")
    assert not (out / "metadata.json").exists()
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 10 and math.isfinite(best["val_loss"])
    for w in load_weights(out / "best" / "adapters.safetensors").values():
        assert np.isfinite(w).all()
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_0000010"
    assert max(r["step"] for r in metrics(tmp_path, "run")) < int(step)


def test_real_overflow_stops_at_once_with_a_clear_message(shared, tmp_path):
    # A huge learning rate only saturates the tiny model (loss ln(vocab)); an absurd LoRA
    # scale overflows float32 for real on the first backward pass.
    proc = run_train(
        tmp_path,
        shared / "small.yaml",
        "run",
        shared / "data",
        "--iters",
        "20",
        "--set",
        "lora_parameters.scale=1e30",
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "the gradient norm is inf at step 1" in proc.stderr
    assert "training stopped" in proc.stderr and "the last checkpoint is none" in proc.stderr
    out = run_dir(tmp_path, "run")
    assert not (out / "best").exists() and not (out / "metadata.json").exists()
    assert not any((out / "checkpoints").glob("step_*"))


# --------------------------------------------------------------------------- configuration


def test_bad_config_values_are_named(shared, tmp_path):
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--set", "fine_tune_type=qlora")
    assert proc.returncode == 2 and "fine_tune_type must be one of lora, dora, full" in proc.stderr
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--set", "no_such_key=1")
    assert proc.returncode == 2 and "no_such_key" in proc.stderr
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--batch-size", "zero")
    assert proc.returncode == 2 and "batch_size" in proc.stderr


def test_lora_keys_name_the_modules_adapted_and_a_misspelt_one_is_refused(shared, tmp_path):
    # mlx-lm passes over a key that matches no module: without the check this run trains q alone
    # ('q_proj' alone is no block's module name, though a name ends with it)
    keys = "lora_parameters.keys=[self_attn.q_proj, self_attn.v_prj, q_proj]"
    proc = run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--set", keys)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "lora_parameters.keys: 'self_attn.v_prj', 'q_proj' names no layer LoRA can adapt" in proc.stderr
    assert "self_attn.v_proj" in proc.stderr  # the names it could have meant
    assert not run_dir(tmp_path, "run").exists()
    proc = run_train(
        tmp_path, shared / "small.yaml", "run", shared / "data", "--set", "lora_parameters.keys=[self_attn]"
    )
    assert proc.returncode == 2 and "lora_parameters: Can't convert layer of type Attention" in proc.stderr
    assert "a block's linear layers: mlp.down_proj, " in proc.stderr and "Traceback" not in proc.stderr
    keys = "lora_parameters.keys=[self_attn.q_proj, self_attn.v_proj]"
    ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", "--set", keys, "--iters", "2"))
    adapted = json.loads((run_dir(tmp_path, "run") / "lora_config.json").read_text())["adapted_modules"]
    blocks = json.loads((ROOT / "models" / "tiny-mistral" / "config.json").read_text())["num_hidden_layers"]
    assert sorted({m.split(".", 3)[3] for m in adapted}) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert len(adapted) == 2 * blocks, adapted


def test_dora_auto_batch_size_and_grad_accumulation(shared, tmp_path):
    proc = ok(
        run_train(
            tmp_path,
            shared / "small.yaml",
            "run",
            shared / "data",
            "--iters",
            "4",
            "--batch-size",
            "auto",
            "--set",
            "fine_tune_type=dora",
            "--set",
            "grad_accumulation_steps=2",
            "--set",
            "auto_batch.max_batch_size=8",
            "--set",
            "grad_checkpoint=true",
            "--set",
            "lr_schedule.warmup=1",
        )
    )
    assert "batch_size auto: 8 (" in proc.stderr and "GB" in proc.stderr, proc.stderr
    out = run_dir(tmp_path, "run")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora" and cfg["batch_size"] == 8
    assert any(k.endswith(".m") for k in load_weights(out / "adapters.safetensors"))
    from mlx_lm import load

    load(str(TINY), adapter_path=str(out))


# --------------------------------------------------------------------------- best/, early stopping, the bundle


def test_best_is_the_lowest_validation_loss_and_patience_stops_early(shared, tmp_path):
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    from train import batches

    # A constant, too-high learning rate: the validation loss falls, then climbs (6e-3 on the
    # sample data: 2.84 -> 2.17 at step 2, then 2.18, 2.50, 3.53; 3e-3 kept falling until step 16).
    options = ["--iters", "20", "--learning-rate", "6e-3", "--eval-every", "2", "--save-every", "4"]
    options += ["--patience", "3", "--set", "lr_schedule.name=constant"]
    proc = ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", *options))
    out = run_dir(tmp_path, "run")
    records = metrics(tmp_path, "run")
    vals = [(r["val_loss"], r["step"]) for r in records if r["val_loss"] is not None and r["step"] > 0]
    best_val, best_step = min(vals)
    meta = json.loads((out / "metadata.json").read_text())
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == best_step == meta["best_step"]
    assert best["val_loss"] == pytest.approx(best_val, abs=1e-9) == meta["best_val_loss"]
    # patience 3: the run ends three evaluations after its best one
    assert meta["stop_reason"] == "early_stopping" and "early stopping" in proc.stderr
    assert meta["steps"] == best_step + 3 * 2 == vals[-1][1] < 20, vals
    assert meta["final_val_loss"] == vals[-1][0] > best_val
    # the best checkpoint survives pruning (keep_last 3) next to the newest ones
    kept = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    assert best_step in kept and kept[-1] == meta["steps"] and len(kept) <= 4
    # best/ really holds the weights with that validation loss
    model, tokenizer = load(str(TINY))
    load_adapters(model, str(out / "best"))
    split = batches.read_split(shared / "data" / "valid.jsonl")
    enc = batches.encode(tokenizer, split.conversations, meta["system_prompt"], True, meta["max_seq_length"])
    loss, _ = batches.evaluate_loss(model, enc.examples, meta["batch_size"])
    assert loss == pytest.approx(best_val, abs=1e-5)
    # the bundle ships best/'s adapter (KEEP=best, the default); last/ holds the final one
    assert (out / "adapters.safetensors").read_bytes() == (out / "best" / "adapters.safetensors").read_bytes()
    assert meta["adapter_source"] == "best" and meta["adapter_step"] == best_step
    assert json.loads((out / "last" / "last.json").read_text())["step"] == meta["steps"]
    assert (
        max_abs_diff(
            load_weights(out / "best" / "adapters.safetensors"),
            load_weights(out / "last" / "adapters.safetensors"),
        )
        > 1e-4
    )
    assert "the **best** adapter" in (out / "INTEGRATION_GUIDE.md").read_text()
    # KEEP=last (--keep last): the final weights ship, from the same checkpoints
    ok(run_train(tmp_path, shared / "small.yaml", "run", shared / "data", *options, "--keep", "last"))
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["adapter_source"] == "last" and meta["adapter_step"] == meta["steps"]
    assert (out / "adapters.safetensors").read_bytes() == (out / "last" / "adapters.safetensors").read_bytes()


def test_bundle_loads_in_mlx_lm_and_keeps_the_worker_contract(shared, reference):
    from mlx_lm import generate, load

    out = reference
    meta = json.loads((out / "metadata.json").read_text())
    for key in (
        "format",
        "base_model",
        "base_model_path",
        "base_model_hash",
        "fine_tune_type",
        "chat_template",
        "system_prompt",
        "generation",
        "max_seq_length",
        "data",
        "steps",
        "best_step",
        "best_val_loss",
        "final_val_loss",
        "wall_time_s",
        "tokens_seen",
        "packages",
        "adapter_file",
        "created_at",
    ):
        assert key in meta, key
    assert meta["format"] == 1 and meta["adapter_file"] == "adapters.safetensors"
    assert meta["base_model"] == "models/tiny-mistral" and meta["base_model_path"] == str(TINY)
    assert len(meta["base_model_hash"]) == 64
    assert meta["chat_template"] and "[INST]" in meta["chat_template"]
    # the config sets none: the one every training conversation carries is recorded
    assert meta["system_prompt"].startswith("És o assistente virtual")
    assert set(meta["generation"]) >= {
        "max_tokens",
        "max_tokens_cap",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
    }
    assert meta["data"]["train"]["count"] == 96 and meta["data"]["valid"]["count"] == 11
    assert meta["data"]["train"]["sha256"] == checkpoint.sha256_file(shared / "data" / "train.jsonl")
    assert set(meta["packages"]) == {"mlx", "mlx-lm", "transformers"}
    assert meta["steps"] == 30 and meta["tokens_seen"] > 0 and meta["wall_time_s"] > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == -1 and cfg["lora_parameters"]["rank"] == 4
    assert json.loads((out / "training_config.json").read_text())["iters"] == 30
    assert json.loads((out / "lora_config.json").read_text())["trainable_parameters"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    guide = (out / "INTEGRATION_GUIDE.md").read_text()
    assert "python -m worker --adapter" in guide and "make worker NAME=run" in guide
    assert "startWorker" in guide and "w.complete({ messages })" in guide
    assert (out / "best" / "adapters.safetensors").is_file() and (
        out / "best" / "adapter_config.json"
    ).is_file()

    model, tokenizer = load(str(TINY), adapter_path=str(out))
    plain, _ = load(str(TINY))
    import mlx.core as mx

    tokens = mx.array([[1, 5, 17, 42, 99, 7]])
    assert np.abs(np.array(model(tokens)) - np.array(plain(tokens))).max() > 1e-3  # the adapter is applied
    text = generate(model, tokenizer, "[INST] Qual é o estádio do Farense? [/INST]", max_tokens=8)
    assert isinstance(text, str) and text
    proc = subprocess.run(
        [
            PY,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(TINY),
            "--adapter-path",
            str(out),
            "--prompt",
            "Qual é o estádio do Farense?",
            "--max-tokens",
            "12",
        ],
        cwd=ROOT,
        env=env_for(shared),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "==========" in proc.stdout


def test_full_fine_tuning_of_the_top_layers(shared, tmp_path):
    ok(
        run_train(
            tmp_path,
            shared / "small.yaml",
            "run",
            shared / "data",
            "--iters",
            "3",
            "--set",
            "fine_tune_type=full",
            "--lora-layers",
            "1",
        )
    )
    out = run_dir(tmp_path, "run")
    names = set(load_weights(out / "adapters.safetensors"))
    assert names and all(n.startswith("model.layers.3.") for n in names)
    assert "model.layers.3.mlp.down_proj.weight" in names
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "full" and cfg["lora_parameters"] is None
    from mlx_lm import load

    load(str(TINY), adapter_path=str(out))


def test_an_mlx_lm_lora_config_carries_over(shared, tmp_path):
    """mlx_lm.lora's own YAML (its keys, its schedule format) trains here unchanged."""
    import yaml

    cfg = {
        "model": "models/tiny-mistral",
        "train": True,
        "data": str(shared / "data"),
        "fine_tune_type": "lora",
        "optimizer": "adamw",
        "seed": 0,
        "num_layers": 2,
        "batch_size": 4,
        "iters": 4,
        "val_batches": 1,
        "learning_rate": 1e-3,
        "steps_per_report": 1,
        "steps_per_eval": 2,
        "resume_adapter_file": None,
        "adapter_path": "adapters",
        "save_every": 2,
        "test": False,
        "test_batches": 10,
        "max_seq_length": 256,
        "grad_checkpoint": False,
        "mask_prompt": True,
        "lora_parameters": {
            "keys": ["self_attn.q_proj", "self_attn.v_proj"],
            "rank": 2,
            "scale": 10.0,
            "dropout": 0.0,
        },
        "lr_schedule": {
            "name": "cosine_decay",
            "warmup": 2,
            "warmup_init": 1e-7,
            "arguments": [1e-3, 4, 1e-5],
        },
    }
    path = tmp_path / "mlx_lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = ok(
        subprocess.run(
            [PY, "-m", "train.train", "--config", str(path), "--name", "m"],
            cwd=ROOT,
            env=env_for(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    out = run_dir(tmp_path, "m")
    names = set(load_weights(out / "adapters.safetensors"))
    assert names and all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in names)
    assert {n.split(".")[2] for n in names} == {"2", "3"}  # num_layers 2: the top two blocks
    import mlx.core as mx
    from mlx_lm.tuner.utils import build_schedule

    schedule = build_schedule(cfg["lr_schedule"])
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path, "m") if r["train_loss"] is not None}
    for step, lr in lrs.items():  # the lr of update number `step` is schedule(step - 1)
        assert lr == pytest.approx(schedule(mx.array(step - 1)).item(), rel=1e-5), proc.stderr
