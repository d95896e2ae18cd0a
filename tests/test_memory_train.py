"""Training inside the memory budget (core/memory.py through the real probe and train.py):
the probe never tries a batch the model predicts over budget, turns on gradient
checkpointing when batch 1 does not fit, and stops before allocating, naming settings that
fit. The probe runs in a subprocess (gradient checkpointing patches the block class)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_train import env_for, prepare_data, run_train, write_config  # noqa: E402

SEQ = 384


def probe_with_budget(where):
    """Run choose_batch_size on the tiny model with LoRA, examples of SEQ tokens and a budget
    between the model's batch-1 needs (where: 'between' checkpointed and not, 'below' both)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import train  # noqa: F401
    from core import memory
    from train import batches
    from train.loss import TargetLoss

    model, _ = load(str(ROOT / "models" / "tiny-mistral"))
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    shape, settings = memory.shape_from_model(model), memory.TrainSettings(num_layers=4)
    plain = memory.training_peak(shape, settings, 1, SEQ, False)["total"]
    ckpt = memory.training_peak(shape, settings, 1, SEQ, True)["total"]
    weights = memory.weight_bytes(shape)
    budget = (plain + ckpt) // 2 if where == "between" else (weights + ckpt) // 2
    examples = [([5 + (i * 7 + j) % 1000 for j in range(SEQ)], 1) for i in range(8)]
    lines, cfg, enabled = [], {"grad_checkpoint": False}, []

    def enable():
        memory.enable_grad_checkpoint(model, cfg)
        enabled.append(True)

    extra = memory.optimizer_state_bytes(model, "adamw")
    try:
        b, why, gc = memory.choose_batch_size(
            model,
            nn.value_and_grad(model, TargetLoss(model).mean_loss),
            examples,
            batches.collate,
            max_batch_size=8,
            memory_fraction=0.8,
            extra_bytes=extra,
            log=lines.append,
            shape=shape,
            settings=settings,
            enable_grad_checkpoint=enable,
            budget_bytes=budget,
        )
        return {
            "batch": b,
            "why": why,
            "gc": gc,
            "enabled": bool(enabled),
            "log": lines,
            "budget": budget,
            "plain": plain,
            "ckpt": ckpt,
        }
    except memory.DoesNotFit as e:
        return {
            "error": str(e),
            "enabled": bool(enabled),
            "log": lines,
            "budget": budget,
            "peak_since_load": int(mx.get_peak_memory()),
        }


def probe_with_replay():
    """The probe with and without replay windows (128 tokens, as train/replay.py cuts them)
    beside conversations of 64 tokens, on a budget that holds 8 conversations and 1 window
    with the base model's logits but not 8 windows: {"without", "batches" (the windows batched
    like the conversations, per_step 0), "per_step" (1 window in every step): (batch, why),
    the peaks}."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    import train  # noqa: F401
    from core import batch_probe, memory
    from train import batches
    from train.loss import ReplayLoss, TargetLoss
    from train.replay import WINDOW

    model, _ = load(str(ROOT / "models" / "tiny-mistral"))
    model.freeze()
    linear_to_lora_layers(model, 4, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    mx.eval(model.parameters())
    model.train()
    chat = [([5 + (i * 7 + j) % 1000 for j in range(64)], 1) for i in range(8)]
    windows = [([5 + (i * 11 + j) % 1000 for j in range(WINDOW)], 0) for i in range(8)]
    chat_step = nn.value_and_grad(model, TargetLoss(model).mean_loss)
    replay_step = nn.value_and_grad(model, ReplayLoss(TargetLoss(model), 1.0).mean_loss)
    extra = memory.optimizer_state_bytes(model, "adamw")

    def peak(step, examples, b):
        return batch_probe._measure(model, step, examples, batches.collate, list(range(b))) + extra

    chat_peaks = {b: peak(chat_step, chat, b) for b in (1, 2, 4, 8)}
    replay_peaks = {b: peak(replay_step, windows, b) for b in (1, 2, 4, 8)}
    budget = int(1.05 * max(chat_peaks[8], replay_peaks[1]))
    out = {"budget": budget, "chat_peaks": chat_peaks, "replay_peaks": replay_peaks}
    cases = (
        ("without", None),
        ("batches", (replay_step, windows, 0)),
        ("per_step", (replay_step, windows, 1)),
    )
    for key, replay in cases:
        b, why, _ = memory.choose_batch_size(
            model,
            chat_step,
            chat,
            batches.collate,
            max_batch_size=8,
            memory_fraction=0.8,
            extra_bytes=extra,
            log=lambda line: None,
            budget_bytes=budget,
            replay=replay,
        )
        out[key] = (b, why)
    return out


def test_the_probe_counts_replay_windows_with_the_base_models_logits():
    r = run_probe("replay")
    peaks = {int(b): p for b, p in r["replay_peaks"].items()}
    assert peaks[8] > r["budget"], r  # the budget is one that replay must lower the batch for
    assert r["without"][0] == 8, r
    batch, why = r["batches"]
    assert 1 <= batch < 8 and peaks[batch] <= r["budget"], r
    assert "replay windows of 128" in why and "a step" not in why, r
    # one window in every step: its pass runs after the batch's, so the batch need not shrink
    batch, why = r["per_step"]
    assert batch == 8 and peaks[1] <= r["budget"], r
    assert "replay windows of 128, 1 a step" in why, r


def run_probe(where):
    proc = subprocess.run(
        [sys.executable, __file__, where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batch_1_over_budget_turns_on_gradient_checkpointing():
    r = run_probe("between")
    assert r["enabled"] and r["gc"], r
    assert r["batch"] >= 1 and "gradient checkpointing turned on" in r["why"], r
    assert any("not trying 1" in line for line in r["log"]), r["log"]  # never tried without it
    peaks = [
        float(p.split(": ")[1].split()[0]) * 1e9
        for p in r["why"].split("incl. optimizer state) ")[1].split(";")[0].split(", ")
    ]
    assert peaks and max(peaks[: r["batch"].bit_length()]) <= r["budget"], r


def test_nothing_fits_stops_before_allocating_and_names_settings():
    r = run_probe("below")
    assert "error" in r and r["enabled"], r
    assert "does not fit the memory budget" in r["error"] and "MAX_SEQ_LENGTH=" in r["error"], r
    assert all("not trying" in line or "turning it on" in line for line in r["log"]), r["log"]
    assert r["peak_since_load"] < r["budget"], r  # no step was run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(tmp_path_factory.mktemp("memdata") / "data")


def test_train_stops_with_exit_2_when_nothing_fits(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", batch_size="auto")
    fraction = 6e6 / psutil.virtual_memory().total  # about the tiny model's weights
    proc = run_train(
        tmp_path,
        config,
        "run",
        data,
        "--set",
        f"auto_batch.memory_fraction={fraction:.3g}",
        env=env_for(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "does not fit the memory budget" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "run" / "checkpoints").exists()


def test_resume_stops_when_the_recorded_batch_no_longer_fits(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", batch_size="auto", iters=4, save_every=2, steps_per_eval=2)
    first = run_train(
        tmp_path, config, "run", data, "--set", "auto_batch.max_batch_size=4", env=env_for(tmp_path)
    )
    assert first.returncode == 0 and "batch_size auto: 4 (" in first.stderr, first.stderr[-2000:]
    step = tmp_path / "models" / "run" / "checkpoints" / "step_0000002"
    assert step.is_dir()
    # the machine is busier now: a budget that holds the weights but not a batch of 4
    fraction = 12e6 / psutil.virtual_memory().total
    proc = run_train(
        tmp_path,
        config,
        "run",
        data,
        "--resume",
        step,
        "--set",
        "auto_batch.max_batch_size=4",
        "--set",
        f"auto_batch.memory_fraction={fraction:.3g}",
        env=env_for(tmp_path),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "started with batch_size 4, which no longer fits" in proc.stderr, proc.stderr[-2000:]
    assert "To continue:" in proc.stderr and "Traceback" not in proc.stderr


def test_a_fixed_batch_over_budget_is_kept_with_a_warning(data, tmp_path):
    config = write_config(tmp_path / "c.yaml", batch_size=4, iters=2, save_every=2, steps_per_eval=2)
    fraction = 8e6 / psutil.virtual_memory().total
    proc = run_train(
        tmp_path,
        config,
        "run",
        data,
        "--set",
        f"auto_batch.memory_fraction={fraction:.3g}",
        env=env_for(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: batch_size 4 of" in proc.stderr and "(memory model), over the budget" in proc.stderr


if __name__ == "__main__":
    print(json.dumps(probe_with_replay() if sys.argv[1] == "replay" else probe_with_budget(sys.argv[1])))
