"""Training inside a memory budget, from the memory model (core/memory_model.py): the peak of
one training step, the largest batch within a budget, the settings that fit, and what to say
when a batch does not (DoesNotFit, naming settings that do). Pure arithmetic on a budget given
in bytes; the budget now is core/memory.py's, the measuring probe core/batch_probe.py's.
"""

from dataclasses import dataclass

from core.config import DEFAULTS, REPLAY_WINDOW
from core.memory_model import (
    GB,
    activation_bytes_per_token,
    replay_bytes_per_token,
    training_state_bytes,
    weight_bytes,
)


class DoesNotFit(Exception):
    """Training would not fit the memory budget; the message names settings that do."""


@dataclass
class TrainSettings:
    num_layers: int = 16
    rank: int = 8
    fine_tune_type: str = "lora"
    optimizer: str = "adamw"
    replay_window: int = 0  # tokens per replay window; 0: no replay text (config `replay`)
    # windows in every step's pass of their own; 0: batches of B windows (config `replay.per_step`)
    replay_per_step: int = DEFAULTS["replay"]["per_step"]

    @classmethod
    def from_cfg(cls, cfg):
        lora = cfg.get("lora_parameters") or {}
        return cls(
            num_layers=int(cfg.get("num_layers", 16)),
            rank=int(lora.get("rank", 8)),
            fine_tune_type=str(cfg.get("fine_tune_type", "lora")),
            optimizer=str(cfg.get("optimizer", "adamw")).lower(),
            replay_window=REPLAY_WINDOW if (cfg.get("replay") or {}).get("data") else 0,
            replay_per_step=int((cfg.get("replay") or {}).get("per_step", cls.replay_per_step)),
        )


def per_sequence_bytes(s, settings, seq_len, grad_checkpoint=False):
    """Activation bytes one row of a batch adds: a conversation padded to seq_len or, where
    replay windows are batched like the conversations (per_step 0), a window (with the base's
    logits), the larger."""
    chat = seq_len * activation_bytes_per_token(s, seq_len, settings.num_layers, grad_checkpoint)
    if settings.replay_per_step:
        return chat
    return max(chat, replay_pass_bytes(s, settings, 1, grad_checkpoint))


def replay_pass_bytes(s, settings, windows, grad_checkpoint=False):
    """Activation bytes of a pass over this many replay windows (0 without replay text)."""
    w = settings.replay_window
    return windows * w * replay_bytes_per_token(s, w, settings.num_layers, grad_checkpoint) if w else 0


def activation_bytes(s, settings, batch_size, seq_len, grad_checkpoint=False):
    """A step's activation peak: batch_size rows (per_sequence_bytes) or, with replay windows in
    every step (per_step K), the K windows' pass, which runs after the batch's (train.py
    Trainer.gradients): the larger."""
    rows = batch_size * per_sequence_bytes(s, settings, seq_len, grad_checkpoint)
    return max(rows, replay_pass_bytes(s, settings, settings.replay_per_step, grad_checkpoint))


def training_peak(s, settings, batch_size, seq_len, grad_checkpoint=False):
    """{weights, parameters, gradients, optimizer, activations, total} of one training step."""
    out = {"weights": weight_bytes(s)}
    out.update(
        training_state_bytes(
            s, settings.num_layers, settings.rank, settings.fine_tune_type, settings.optimizer
        )
    )
    out["activations"] = activation_bytes(s, settings, batch_size, seq_len, grad_checkpoint)
    out["total"] = sum(out.values())
    return out


def largest_batch(s, settings, seq_len, budget, grad_checkpoint=False, cap=1 << 16):
    """The largest batch whose predicted peak is within budget (0: not even 1)."""
    empty = training_peak(s, settings, 0, seq_len, grad_checkpoint)  # with per-step replay windows
    if empty["total"] > budget:
        return 0
    state = empty["total"] - empty["activations"]  # weights, adapters, gradients, optimizer
    per_seq = per_sequence_bytes(s, settings, seq_len, grad_checkpoint)
    return int(max(0, min(cap, (budget - state) // max(per_seq, 1))))


def settings_that_fit(s, settings, budget, seq_lens=(4096, 2048, 1024, 512, 256, 128)):
    """[(max_seq_length, batch_size, grad_checkpoint)] that the model predicts fit."""
    out = []
    for L in seq_lens:
        for gc in (False, True):
            b = largest_batch(s, settings, L, budget, gc)
            if b >= 1:
                out.append((L, b, gc))
                break
    return out


def does_not_fit_message(s, settings, budget, seq_len, why):
    fits = settings_that_fit(s, settings, budget)
    need = training_peak(s, settings, 1, seq_len, True)["total"]
    lines = [
        f"error: training does not fit the memory budget: {why}; batch 1 of "
        f"{seq_len} tokens needs about {need / GB:.2f} GB even with gradient checkpointing"
    ]
    if fits:
        opts = "; ".join(
            f"make train MAX_SEQ_LENGTH={L} BATCH_SIZE={b}" + (" GRAD_CHECKPOINT=1" if gc else "")
            for L, b, gc in fits[:3]
        )
        lines.append(
            f"settings that fit: {opts} (or max_seq_length, batch_size and "
            "grad_checkpoint in the config; longer examples are cut)"
        )
    else:
        lines.append(
            "nothing fits: the weights alone "
            f"({weight_bytes(s) / GB:.2f} GB) leave too little; free memory (another "
            "process, e.g. a worker?) or use a smaller or quantized model"
        )
    return ". ".join(lines)


def check_recorded_batch(
    shape, settings, batch_size, seq_len, grad_checkpoint, budget_bytes, source, log=print
):
    """A resumed run keeps its batch size (exact resume); does it still fit budget_bytes (whose
    origin is source)? Logs that it does, or raises DoesNotFit saying how to continue."""
    need = training_peak(shape, settings, batch_size, seq_len, grad_checkpoint)["total"]
    if need <= budget_bytes:
        log(
            f"memory: batch_size {batch_size} still fits ({need / GB:.2f} GB predicted, "
            f"budget {budget_bytes / GB:.2f} GB = {source})"
        )
        return
    fix = []
    if (
        not grad_checkpoint
        and training_peak(shape, settings, batch_size, seq_len, True)["total"] <= budget_bytes
    ):
        fix.append("resume with grad_checkpoint: true (same results, ~30% slower)")
    fix.append("free memory (stop other processes, e.g. a worker) and resume")
    b = largest_batch(shape, settings, seq_len, budget_bytes, True)
    if b >= 1:
        fix.append(
            f"or start over with FRESH=1 BATCH_SIZE={b} (a new batch size changes the "
            "trajectory, so it cannot continue this run)"
        )
    raise DoesNotFit(
        f"error: this run was started with batch_size {batch_size}, which no longer "
        f"fits: about {need / GB:.2f} GB predicted for {seq_len}-token batches, "
        f"budget {budget_bytes / GB:.2f} GB = {source}. To continue: " + "; ".join(fix)
    )
