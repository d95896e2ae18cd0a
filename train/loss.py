"""The loss of training, validation and evaluation: mlx-lm's default_loss (cross-entropy over the
targets collate's lengths select), with the output layer applied at those targets only.

default_loss computes the logits of every position, padding and prompt included, then masks
most of them away. The output layer is vocabulary x hidden: on a 135M-270M model with a
49k-262k vocabulary it is a large share of each step's work and memory (gemma-3-270m: 168M of
its 268M parameters), and the prompt (system prompt and question) is most of each sequence.
So TargetLoss runs the model's body on every position, as attention needs, and its output
layer only on the hidden states of the targets: the same per-target losses, less of the rest.

It needs the model split into body and output layer. mlx-lm's models are `model.model` (the
blocks and the final norm) followed by `lm_head` or the tied embedding's `as_linear`; the split
is taken only when it reproduces `model(inputs)` on a probe, else the full logits are used, so
an architecture that does something else after the body (a soft cap, a scale) stays exact.
The trainer's (keep_frozen) starts the body's pass over a batch met before from the kept
output of the frozen blocks below the adapted ones (train/frozen_blocks.py), the same numbers.

ReplayLoss is the other term a run can train with (config `replay`, train/replay.py): on raw
text, the KL divergence from the base model's next-token distribution to the adapted model's,
the base's taken from the same model with its LoRA adapters switched off (adapters_off). The
base never changes, so where the replay text is small (MAX_KEPT_BYTES) the base's hidden states
at a batch of windows' targets are computed once, outside the gradient (keep_base), and a batch
met again runs only the output layer for the base's side."""

from contextlib import contextmanager, nullcontext

import numpy as np

from train.frozen_blocks import FrozenBottom

PROBE_IDS = [[1, 2, 3, 4, 5, 6, 7, 8]]


def target_rows(lengths, width):
    """Row indices into the flattened (batch x width) targets that the loss counts: row b's
    positions max(offset, 1) - 1 .. last - 1, where lengths[b] = (offset, last) (collate)."""
    rows = [
        b * width + np.arange(max(int(offset), 1) - 1, int(last))
        for b, (offset, last) in enumerate(np.asarray(lengths).tolist())
    ]
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, np.int32)


def output_parts(model):
    """(body, head) as mlx-lm builds a causal LM: `model.model` (blocks and final norm), then
    `lm_head` or the tied embedding's `as_linear`; None where the model has no such parts."""
    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    head = (
        model["lm_head"]
        if "lm_head" in model
        else getattr(getattr(body, "embed_tokens", None), "as_linear", None)
    )
    return None if head is None else (body, head)


def splits_exactly(model):
    """Whether head(body(x)) is model(x) on a probe: nothing after the head (a soft cap, a
    scale) that computing the head at some positions would leave out."""
    import mlx.core as mx

    parts = output_parts(model)
    if parts is None:
        return False
    probe = mx.array(PROBE_IDS)
    was_training = model.training
    model.eval()  # dropout off: both sides must see the same weights
    try:
        full, split = model(probe), parts[1](parts[0](probe))
        return full.shape == split.shape and mx.allclose(full, split, rtol=1e-4, atol=1e-4).item()
    except (AttributeError, TypeError, ValueError):
        return False
    finally:
        model.train(was_training)


class TargetLoss:
    """Per-target cross-entropy, as default_loss computes it, for one model. `sum_loss` is the
    trainer's (share's sum / the global batch's target count, the sum) and `mean_loss` has
    default_loss's signature and result ((mean, target count)) for evaluate_loss."""

    def __init__(self, model, keep_frozen=False):
        self.targets_only = splits_exactly(model)
        # keep_frozen: the frozen blocks' output kept per batch (keep), and passes start from it
        self.frozen = FrozenBottom(model) if keep_frozen else None

    def logits_at(self, model, inputs, rows):
        """The logits at these rows of the flattened positions (target_rows), in row order."""
        if not self.targets_only:
            with self.from_kept_bottom(model, inputs):
                logits = model(inputs)
            return logits.reshape(-1, logits.shape[-1])[rows]
        return output_parts(model)[1](self.hidden_at(model, inputs, rows))

    def hidden_at(self, model, inputs, rows):
        """The body's final hidden states at these rows, what the output layer takes (a model
        split by output_parts; looked up at each call: a module replaced later is used)."""
        with self.from_kept_bottom(model, inputs):
            hidden = output_parts(model)[0](inputs)
        return hidden.reshape(-1, hidden.shape[-1])[rows]

    def from_kept_bottom(self, model, inputs):
        return self.frozen.reused(model, inputs) if self.frozen is not None else nullcontext()

    def token_losses(self, model, batch, lengths):
        """float32 losses of the targets, in row order (padding and prompt left out)."""
        import mlx.core as mx
        import mlx.nn as nn

        inputs, targets = batch[:, :-1], batch[:, 1:]
        rows = mx.array(target_rows(lengths, targets.shape[1]))
        logits = self.logits_at(model, inputs, rows)
        return nn.losses.cross_entropy(logits, targets.reshape(-1)[rows]).astype(mx.float32)

    def sum_loss(self, model, batch, lengths, global_count):
        total = self.token_losses(model, batch, lengths).sum()
        return total / global_count, total

    def mean_loss(self, model, batch, lengths):
        import mlx.core as mx

        losses = self.token_losses(model, batch, lengths)
        return losses.sum() / max(losses.size, 1), mx.array(losses.size)


def lora_modules(model):
    """The LoRA layers mlx-lm added (LoRALinear, LoRASwitchLinear, LoRAEmbedding): each adds
    scale x (x A) B to its frozen base layer."""
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


@contextmanager
def adapters_off(model):
    """The base model: every LoRA layer's scale 0 while inside (restored on the way out)."""
    layers = lora_modules(model)
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield model
    finally:
        for m, scale in zip(layers, scales):
            m.scale = scale


MAX_KEPT_BYTES = 64 << 20  # kept only up to this: outside the memory plan (docs/MEMORY.md)


def batch_key(batch, lengths):
    """What identifies a batch of windows among the kept ones: its tokens, padding and targets."""
    return np.asarray(batch, np.int32).tobytes() + np.asarray(lengths, np.int32).tobytes()


@contextmanager
def base_model(model):
    """The base model as the replay's KL takes it: adapters off, dropout off. No random draws,
    so whether a base pass is kept or run again leaves every later dropout mask as it was."""
    was_training = model.training
    model.eval()
    try:
        with adapters_off(model):
            yield model
    finally:
        model.train(was_training)


class ReplayLoss:
    """KL(base || adapted) per target token of raw-text windows: the adapted model's next-token
    distribution held to the base's where the text is not the club's. With fresh adapters
    (B = 0) it is 0. `sum_loss` has TargetLoss.sum_loss's signature: (weight x the share's KL
    sum / the global batch's target count, the KL sum unweighted, as the loop reports it).

    kept_bytes: the size of the base's hidden states at every target of the batches to come
    (replay.kept_bytes); within MAX_KEPT_BYTES, and with the output layer split off
    (TargetLoss.targets_only), keep_base keeps each batch's, and a batch met again runs only the
    output layer for the base: the same computation on the same shapes, so the same numbers."""

    def __init__(self, target_loss, weight, kept_bytes=None):
        self.target_loss, self.weight = target_loss, float(weight)
        keeps = kept_bytes is not None and kept_bytes <= MAX_KEPT_BYTES and target_loss.targets_only
        self.kept = {} if keeps else None  # batch_key -> the base's hidden states at its targets

    def keep_base(self, model, batch, lengths):
        """Outside the gradient, before a step: this batch's base hidden states at its targets
        (TargetLoss.hidden_at, as logits_at computes them), if keeping and not kept yet."""
        import mlx.core as mx

        key = batch_key(batch, lengths)
        if self.kept is not None and key not in self.kept:
            rows = mx.array(target_rows(lengths, batch.shape[1] - 1))
            with base_model(model):
                self.kept[key] = self.target_loss.hidden_at(model, batch[:, :-1], rows)
            mx.eval(self.kept[key])

    def base_logits(self, model, batch, lengths, rows):
        """The base's logits at the targets (float32, no gradient), from the kept hidden states
        where the batch's are kept."""
        import mlx.core as mx

        kept = None if self.kept is None else self.kept.get(batch_key(batch, lengths))
        with base_model(model):
            if kept is None:
                logits = self.target_loss.logits_at(model, batch[:, :-1], rows)
            else:
                logits = output_parts(model)[1](kept)
        return mx.stop_gradient(logits.astype(mx.float32))

    def token_losses(self, model, batch, lengths):
        """float32 KL of each target, in row order."""
        import mlx.core as mx

        inputs = batch[:, :-1]
        rows = mx.array(target_rows(lengths, inputs.shape[1]))
        base = self.base_logits(model, batch, lengths, rows)
        tuned = self.target_loss.logits_at(model, inputs, rows).astype(mx.float32)
        base_logp = base - mx.logsumexp(base, axis=-1, keepdims=True)
        tuned_logp = tuned - mx.logsumexp(tuned, axis=-1, keepdims=True)
        return (mx.exp(base_logp) * (base_logp - tuned_logp)).sum(axis=-1)

    def sum_loss(self, model, batch, lengths, global_count):
        total = self.token_losses(model, batch, lengths).sum()
        return self.weight * total / global_count, total

    def mean_loss(self, model, batch, lengths):
        """TargetLoss.mean_loss's signature: (weight x the batch's mean KL, target count), for
        the batch-size probe, which runs one batch alone."""
        import mlx.core as mx

        losses = self.token_losses(model, batch, lengths)
        return self.weight * losses.sum() / max(losses.size, 1), mx.array(losses.size)
