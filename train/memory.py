"""batch_size: auto - the largest batch that fits this machine's memory, found by trying.

Each probe runs one forward and backward pass (no optimizer update, so the weights do not
change) on the longest examples, padded as training pads them, and reads mlx's peak memory.
The optimizer's state, which does not exist yet, is added as an estimate. Probing stops
before a batch that would (by linear extrapolation) exceed the budget, so it never asks for
much more memory than it has.
"""


def device_memory():
    """(bytes, where the number comes from): Metal/CUDA report theirs; CPU uses system RAM."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key]), f"mx.device_info()['{key}']"
    import psutil
    return int(psutil.virtual_memory().total), "psutil total memory (CPU)"


def optimizer_state_bytes(model, optimizer_name):
    """What the optimizer will hold per trainable parameter (Adam: two moments)."""
    from mlx.utils import tree_flatten

    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    factor = {"adam": 2, "adamw": 2, "sgd": 1, "muon": 1, "adafactor": 1}.get(optimizer_name, 2)
    return trainable * factor


def _candidates(limit):
    sizes, b = [], 1
    while b <= limit:
        sizes.append(b)
        b *= 2
    if sizes and sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def probe(model, loss_and_grad, examples, collate, *, max_batch_size, memory_fraction,
          extra_bytes=0, log=print):
    """Pick the batch size; returns (batch_size, explanation)."""
    import mlx.core as mx

    total, source = device_memory()
    budget = total * memory_fraction
    limit = max(1, min(int(max_batch_size), len(examples)))
    longest = sorted(range(len(examples)), key=lambda i: len(examples[i][0]), reverse=True)
    probes, chosen = [], None
    model.train()
    for b in _candidates(limit):
        if len(probes) >= 2:
            (b1, m1), (b2, m2) = probes[-2], probes[-1]
            per_example = max((m2 - m1) / (b2 - b1), 0)
            if m2 + per_example * (b - b2) > budget:
                log(f"batch_size auto: stop probing before {b} (predicted "
                    f"{(m2 + per_example * (b - b2)) / 1e9:.2f} GB > budget)")
                break
        batch, lengths, _ = collate(examples, longest[:b])
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        mx.eval(loss, grads)
        peak = mx.get_peak_memory() + extra_bytes
        del loss, grads
        probes.append((b, peak))
        if peak > budget:
            break
        chosen = b
    mx.clear_cache()
    mx.reset_peak_memory()
    table = ", ".join(f"{b}: {m / 1e9:.3f} GB" for b, m in probes)
    why = (f"budget {memory_fraction:g} x {total / 1e9:.1f} GB ({source}) = {budget / 1e9:.1f} GB; "
           f"peak per batch size (longest examples, incl. optimizer state) {table}")
    if chosen is None:
        return 1, (why + "; even batch size 1 exceeds the budget - expect swapping or an "
                   "out-of-memory error (try grad_checkpoint: true or a smaller max_seq_length)")
    if chosen == limit:
        cap = (f"max_batch_size {max_batch_size}" if limit == max_batch_size
               else f"the {len(examples)} training examples")
        why += f"; capped by {cap} (auto_batch.max_batch_size)"
    return chosen, why

