"""Memory: the budget, and training's checks against it. One model of the memory a run needs
(formulas in docs/MEMORY.md), one module per part:

- core/memory_model.py: the arithmetic, a model's Shape (from config.json or a loaded model)
  and its bytes: weights, LoRA + optimizer state, activations per token, KV and prefill per token;
- core/training_budget.py: training in a budget: one step's peak (checked against mlx's
  measured peak in tests/test_memory.py), the largest batch, the settings that fit, DoesNotFit;
- core/batch_probe.py: batch_size: auto, found by measuring;
- core/worker_budget.py: the worker's limits (max batch, prefill chunk, prefix-cache and
  buffer-cache bytes);
- core/device.py: what the device gives (its memory, what is available now, the wired limit);
- here: the budget, the smaller of a fraction of the device's memory and the memory available
  now (other processes count), and the entry points train.py calls: the batch size chosen, a
  resumed or a fixed batch size checked against the budget now.

Callers import this module; the names they use from the others are re-exported here (new
code may import the module that holds a name).
"""

import sys
from pathlib import Path

from core.batch_probe import find_batch_size, optimizer_state_bytes
from core.device import available_memory, device_memory, set_wired_limit
from core.memory_model import (
    GB,
    RUNTIME_BYTES,
    _matrix_bytes,
    activation_bytes_per_token,
    kv_bytes_per_token,
    read_config,
    replay_bytes_per_token,
    shape_from_config,
    shape_from_model,
    training_state_bytes,
    weight_bytes,
)
from core.training_budget import (
    DoesNotFit,
    TrainSettings,
    check_recorded_batch,
    does_not_fit_message,
    largest_batch,
    training_peak,
)
from core.worker_budget import KV_STEP, WORKER_MAX_BATCH, worker_limits

# The public names: this module's own and, re-exported, those of the others that callers
# (train, worker, bench, tests) use through it.
__all__ = [
    "auto_batch_size",
    "budget",
    "check_fixed_batch_size",
    "check_resume",
    "check_resumed_batch_size",
    "choose_batch_size",
    "enable_grad_checkpoint",
    "KV_STEP",
    "WORKER_MAX_BATCH",
    "RUNTIME_BYTES",
    "DoesNotFit",
    "TrainSettings",
    "_matrix_bytes",
    "activation_bytes_per_token",
    "available_memory",
    "device_memory",
    "does_not_fit_message",
    "kv_bytes_per_token",
    "largest_batch",
    "optimizer_state_bytes",
    "read_config",
    "replay_bytes_per_token",
    "set_wired_limit",
    "shape_from_config",
    "shape_from_model",
    "training_peak",
    "training_state_bytes",
    "weight_bytes",
    "worker_limits",
]


# --------------------------------------------------------------------------- the budget now


def high_water_mark(pid="self"):
    """A running process's RSS high-water mark in bytes, the kernel's (Linux: VmHWM in
    /proc/PID/status); None where there is no /proc. Not getrusage's ru_maxrss: Linux keeps the
    forking parent's across exec, so a child of a 2 GB pytest 'peaked' at 2 GB (2026-12-05)."""
    path = Path(f"/proc/{pid}/status")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None  # a zombie: its memory is gone


def maxrss_bytes(usage):
    """A getrusage/wait4 result's ru_maxrss in bytes (macOS counts bytes, Linux KiB): the
    high-water mark where there is no /proc, the forking parent's included on Linux."""
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def budget(fraction, held=0, total=None, available=None):
    """(bytes, explanation): min(fraction x the device's memory, available now + held), where
    held is what this process already holds (its loaded weights are not 'available')."""
    if total is None:
        total, source = device_memory()
    else:
        source = "given"
    if available is None:
        available = available_memory()
    by_device, by_now = total * fraction, available + held
    if by_now < by_device:
        why = (
            f"{by_now / GB:.1f} GB available now (less than {fraction:g} x "
            f"{total / GB:.1f} GB, {source}: other processes hold the rest)"
        )
    else:
        why = f"{fraction:g} x {total / GB:.1f} GB ({source}) = {by_device / GB:.1f} GB"
    return int(min(by_device, by_now)), why


def choose_batch_size(
    model,
    loss_and_grad,
    examples,
    collate,
    *,
    max_batch_size,
    memory_fraction,
    extra_bytes=0,
    log=print,
    shape=None,
    settings=None,
    grad_checkpoint=False,
    enable_grad_checkpoint=None,
    budget_bytes=None,
    replay=None,
):
    """Pick the batch size within the budget now (core/batch_probe.py); returns (batch_size,
    explanation, grad_checkpoint). budget_bytes overrides the budget (tests); replay:
    (loss_and_grad, windows, per_step) of a run with replay text."""
    import mlx.core as mx

    if budget_bytes is None:
        budget_bytes, source = budget(memory_fraction, held=int(mx.get_active_memory()))
    else:
        source = "given"
    return find_batch_size(
        model,
        loss_and_grad,
        examples,
        collate,
        max_batch_size=max_batch_size,
        budget_bytes=budget_bytes,
        source=source,
        extra_bytes=extra_bytes,
        log=log,
        shape=shape,
        settings=settings,
        grad_checkpoint=grad_checkpoint,
        enable_grad_checkpoint=enable_grad_checkpoint,
        replay=replay,
    )


def check_resume(shape, settings, batch_size, seq_len, grad_checkpoint, memory_fraction, held=0, log=print):
    """A resumed run keeps its batch size (exact resume); does it still fit the budget now?
    Raises DoesNotFit saying so and how to continue."""
    budget_bytes, source = budget(memory_fraction, held=held)
    check_recorded_batch(shape, settings, batch_size, seq_len, grad_checkpoint, budget_bytes, source, log)


# --------------------------------------------------------------------------- train.py's entry points


def enable_grad_checkpoint(model, cfg):
    """mlx-lm's gradient checkpointing on every block (as grad_checkpoint: true does)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    grad_checkpoint(model.layers[0])
    cfg["grad_checkpoint"] = True


def auto_batch_size(
    model,
    loss_and_grad,
    examples,
    collate,
    cfg,
    *,
    max_batch_size,
    memory_fraction,
    extra_bytes=0,
    log=print,
    replay=None,
):
    """batch_size: auto with the memory model: (batch_size, explanation); may turn on
    cfg['grad_checkpoint']; raises DoesNotFit (before allocating) when nothing fits. replay:
    (loss_and_grad, windows, per_step) of a run with replay text, probed too."""
    set_wired_limit(log)
    try:
        shape = shape_from_model(model)
    except Exception as e:  # not a Mistral/Llama-shaped model: measuring alone
        log(f"memory: no memory model for this architecture ({type(e).__name__}: {e}); probing only")
        shape = None
    b, why, _ = choose_batch_size(
        model,
        loss_and_grad,
        examples,
        collate,
        max_batch_size=max_batch_size,
        memory_fraction=memory_fraction,
        extra_bytes=extra_bytes,
        log=log,
        shape=shape,
        settings=TrainSettings.from_cfg(cfg),
        grad_checkpoint=bool(cfg.get("grad_checkpoint")),
        enable_grad_checkpoint=None
        if cfg.get("grad_checkpoint")
        else lambda: enable_grad_checkpoint(model, cfg),
        replay=replay,
    )
    return b, why


def _run_plan(model, cfg, examples):
    """(shape, settings, longest sequence, grad_checkpoint) of a training run, or None when the
    model's shape cannot be read (then the memory model stays out of the way)."""
    try:
        shape = shape_from_model(model)
    except Exception:
        return None
    seq_len = max((len(ids) for ids, _ in examples), default=1)
    return shape, TrainSettings.from_cfg(cfg), seq_len, bool(cfg.get("grad_checkpoint"))


def check_resumed_batch_size(model, cfg, batch_size, examples, memory_fraction, log=print):
    """A resumed run's recorded batch size against the budget now: turns on gradient
    checkpointing when that is enough (same results), else raises DoesNotFit with what to do."""
    import mlx.core as mx

    set_wired_limit(log)
    plan = _run_plan(model, cfg, examples)
    if plan is None:
        return
    shape, settings, seq_len, gc = plan
    held = int(mx.get_active_memory())
    if not gc:
        budget_bytes, _ = budget(memory_fraction, held=held)
        if (
            training_peak(shape, settings, batch_size, seq_len, False)["total"]
            > budget_bytes
            >= training_peak(shape, settings, batch_size, seq_len, True)["total"]
        ):
            log(
                f"memory: batch_size {batch_size} no longer fits without gradient checkpointing; "
                "turning it on (same results, slower)"
            )
            enable_grad_checkpoint(model, cfg)
            gc = True
    check_resume(shape, settings, batch_size, seq_len, gc, memory_fraction, held=held, log=log)


def check_fixed_batch_size(model, cfg, batch_size, examples, memory_fraction, log=print):
    """A batch size given in the config is kept; warn (naming what fits) when the model
    predicts it over the budget: on Metal an out-of-memory aborts the process."""
    import mlx.core as mx

    plan = _run_plan(model, cfg, examples)
    if plan is None:
        return
    shape, settings, seq_len, gc = plan
    budget_bytes, why = budget(memory_fraction, held=int(mx.get_active_memory()))
    need = training_peak(shape, settings, batch_size, seq_len, gc)["total"]
    if need > budget_bytes:
        b = largest_batch(shape, settings, seq_len, budget_bytes, gc)
        log(
            f"warning: batch_size {batch_size} of {seq_len}-token batches needs about {need / GB:.2f} GB "
            f"(memory model), over the budget {budget_bytes / GB:.2f} GB ({why}); "
            + (
                f"BATCH_SIZE={b} fits"
                if b >= 1
                else "even 1 does not: GRAD_CHECKPOINT=1 or a smaller MAX_SEQ_LENGTH"
            )
            + " (or batch_size: auto)"
        )
