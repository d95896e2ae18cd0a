"""batch_size: auto - the largest batch that fits, found by trying.

Each probe runs one forward and backward pass (no optimizer update, so the weights do not
change) on the longest examples, padded as training pads them, and reads mlx's peak memory; in
a run with replay text, a pass over replay windows too (it holds the base model's logits): as
many as the batch's rows where they are batched like the conversations, the per_step windows
of every step otherwise; the larger peak counts.
The optimizer's state, which does not exist yet, is added as an estimate
(optimizer_state_bytes). A batch whose predicted peak (core/training_budget.py) is over the
budget is never tried (a Metal out-of-memory is an abort no code can catch); when batch 1 does
not fit, gradient checkpointing is turned on and the probe tried again; when even that does
not fit, training stops before allocating anything, naming settings that fit. The budget is
given (core/memory.py's choose_batch_size asks for it).
"""

from core.memory_model import ADAM_MOMENTS, GB
from core.training_budget import DoesNotFit, does_not_fit_message, training_peak


def optimizer_state_bytes(model, optimizer_name):
    """What the optimizer will hold per trainable parameter (Adam: two moments)."""
    from mlx.utils import tree_flatten

    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    return trainable * ADAM_MOMENTS.get(optimizer_name, 2)


def _candidates(limit):
    sizes, b = [], 1
    while b <= limit:
        sizes.append(b)
        b *= 2
    if sizes and sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def _measure(model, loss_and_grad, examples, collate, indices):
    import mlx.core as mx

    batch, lengths, _ = collate(examples, indices)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    (loss, _), grads = loss_and_grad(model, batch, lengths)
    mx.eval(loss, grads)
    peak = mx.get_peak_memory()
    del loss, grads
    return peak


def _peak_of_batch(model, loss_and_grad, examples, collate, rows, replay, replay_peaks):
    """mlx's peak for a batch of these rows and, in a run with replay text, for its replay
    windows' pass: as many windows as rows (per_step 0), else per_step: the larger (the
    windows' pass holds the base model's logits too). replay_peaks: {windows: peak} already
    measured in this probe (per_step windows are the same pass at every batch size)."""
    peak = _measure(model, loss_and_grad, examples, collate, rows)
    if replay:
        replay_loss_and_grad, windows, per_step = replay
        n = min(per_step or len(rows), len(windows))
        if n not in replay_peaks:
            replay_peaks[n] = _measure(model, replay_loss_and_grad, windows, collate, list(range(n)))
        peak = max(peak, replay_peaks[n])
    return peak


def _what_was_probed(seq_len, replay):
    what = f"longest examples, {seq_len} tokens"
    if replay:
        _, windows, per_step = replay
        longest = max(len(ids) for ids, _ in windows)
        what += f", or replay windows of {longest}" + (f", {per_step} a step" if per_step else "")
    return what


def _probe_sizes(measure, limit, budget_bytes, predict, extra_bytes, log):
    """[(batch, measured peak)] and the largest batch within budget (None: not even 1)."""
    probes, chosen = [], None
    for b in _candidates(limit):
        predicted = predict(b)
        if predicted is not None and predicted > budget_bytes:
            log(
                f"batch_size auto: not trying {b} (the memory model predicts "
                f"{predicted / GB:.2f} GB > budget {budget_bytes / GB:.2f} GB)"
            )
            break
        if len(probes) >= 2:
            (b1, m1), (b2, m2) = probes[-2], probes[-1]
            extrapolated = m2 + max((m2 - m1) / (b2 - b1), 0) * (b - b2)
            if extrapolated > budget_bytes:
                log(
                    f"batch_size auto: stop probing before {b} (predicted "
                    f"{extrapolated / GB:.2f} GB > budget)"
                )
                break
        peak = measure(b) + extra_bytes
        probes.append((b, peak))
        if peak > budget_bytes:
            break
        chosen = b
    return probes, chosen


def find_batch_size(
    model,
    loss_and_grad,
    examples,
    collate,
    *,
    max_batch_size,
    budget_bytes,
    source,
    extra_bytes=0,
    log=print,
    shape=None,
    settings=None,
    grad_checkpoint=False,
    enable_grad_checkpoint=None,
    replay=None,
):
    """Pick the batch size within budget_bytes (whose origin is source); returns (batch_size,
    explanation, grad_checkpoint). replay: (loss_and_grad, windows, per_step) of a run with
    replay text.

    shape/settings (the memory model): batches predicted over budget are not tried. When
    batch 1 does not fit and grad_checkpoint is off, enable_grad_checkpoint() is called and
    the probe runs again. Raises DoesNotFit when nothing fits."""
    import mlx.core as mx

    limit = max(1, min(int(max_batch_size), len(examples)))
    longest = sorted(range(len(examples)), key=lambda i: len(examples[i][0]), reverse=True)
    seq_len = max(len(examples[i][0]) for i in longest[:1]) if examples else 1
    model.train()

    def probe(gc):
        replay_peaks = {}  # measured anew after checkpointing is turned on

        def measure(b):
            return _peak_of_batch(model, loss_and_grad, examples, collate, longest[:b], replay, replay_peaks)

        predict = (
            (lambda b: None)
            if shape is None
            else (lambda b: training_peak(shape, settings, b, seq_len, gc)["total"])
        )
        return _probe_sizes(measure, limit, budget_bytes, predict, extra_bytes, log)

    probes, chosen = probe(grad_checkpoint)
    note = ""
    if chosen is None and not grad_checkpoint and enable_grad_checkpoint is not None:
        log(
            f"batch_size auto: batch 1 of {seq_len} tokens does not fit {budget_bytes / GB:.2f} GB "
            "without gradient checkpointing; turning it on"
        )
        enable_grad_checkpoint()
        grad_checkpoint, note = True, "; gradient checkpointing turned on (batch 1 did not fit without)"
        probes, chosen = probe(True)
    mx.clear_cache()
    mx.reset_peak_memory()
    table = ", ".join(f"{b}: {m / GB:.3f} GB" for b, m in probes) or "none tried"
    why = (
        f"budget {budget_bytes / GB:.2f} GB = {source}; peak per batch size "
        f"({_what_was_probed(seq_len, replay)}, incl. optimizer state) {table}{note}"
    )
    if chosen is None:
        if shape is None:
            raise DoesNotFit(
                f"error: even batch size 1 exceeds the memory budget ({why}); "
                "try grad_checkpoint: true or a smaller max_seq_length"
            )
        raise DoesNotFit(does_not_fit_message(shape, settings, budget_bytes, seq_len, why))
    if chosen == limit:
        cap = (
            f"max_batch_size {max_batch_size}"
            if limit == max_batch_size
            else f"the {len(examples)} training examples"
        )
        why += f"; capped by {cap} (auto_batch.max_batch_size)"
    return chosen, why, grad_checkpoint
