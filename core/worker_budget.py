"""The worker's limits from the memory model (core/memory_model.py): the largest batch whose
every sequence may reach the context, the prefill chunk, the prefix cache and mlx's buffer
cache, all within a budget given in bytes (the budget now is core/memory.py's; worker/limits.py
asks for both and applies the result).
"""

from core.memory_model import kv_bytes_per_token, prefill_bytes_per_token, weight_bytes

KV_STEP = 256  # mlx-lm's KV caches grow in steps of 256 tokens
WORKER_MAX_BATCH = 32  # the worker's batch when memory is no limit
PREFILL_BATCH = 8  # prompts mlx-lm's BatchGenerator prefills at once (its default; worker/engine.py)
# Prefill chunk sizes tried, longest first. Without fused attention (the CPU) a chunk computes
# chunk x prefix softmax scores with mlx's scalar exp, the largest cost of a long prompt, so
# short chunks are faster: 256 took 0.82x the time of 1024 on a 1,000-token prompt
# (docs/PERFORMANCE.md, Prefill against the compute roofline).
PREFILL_STEPS = (2048, 1024, 512, 256)
PREFILL_STEPS_UNFUSED = (256,)


def prompts(max_batch):
    """Prompts in one prefill chunk: mlx-lm's BatchGenerator prefills at most its
    prefill_batch_size (min(PREFILL_BATCH, max_batch), worker/engine.py) at a time."""
    return max(1, min(PREFILL_BATCH, int(max_batch)))


def _kv_with_growth(s, ctx):
    """KV bytes of one sequence of ctx tokens as mlx-lm allocates it (256-token steps), plus
    its share of the bounded buffer cache (two growth steps)."""
    return kv_bytes_per_token(s) * (-(-ctx // KV_STEP) * KV_STEP + 2 * KV_STEP)


def _fit(s, budget_bytes, ctx, n_prompts, fused_attention, step_given, prefix_given):
    """One plan at context ctx with n_prompts prompts per prefill chunk: (prefill step, the
    chunk's transient bytes, the prefix cache's bytes, how many full-context sequences fit)."""
    per_token = n_prompts * prefill_bytes_per_token(s, ctx, fused_attention)
    steps = PREFILL_STEPS if fused_attention else PREFILL_STEPS_UNFUSED
    step = step_given or next((n for n in steps if n * per_token <= budget_bytes / 8), 128)
    transient = min(step, ctx) * per_token
    free = budget_bytes - weight_bytes(s) - transient
    prefix = prefix_given if prefix_given is not None else int(min(max(free // 4, 0), 1 << 30))
    fits = max(0, int((free - prefix) // _kv_with_growth(s, ctx)))
    if fits < 1 and prefix_given is None:  # capping: the prefix cache goes first
        prefix, fits = 0, max(0, int(free // _kv_with_growth(s, ctx)))
    return step, transient, prefix, fits


def worker_limits(
    s,
    budget_bytes,
    context_length,
    *,
    max_batch=None,
    prefix_cache_bytes=None,
    prefill_step_size=None,
    fused_attention=True,
    cap=WORKER_MAX_BATCH,
):
    """The worker's limits from the memory model. Every sequence of a batch may reach the
    context length, so max_batch x context x KV bytes fits next to the weights, one prefill
    chunk, mlx's buffer cache and the prefix cache (a quarter of what is left, at most 1 GiB).
    The chunk holds as many prompts as mlx-lm prefills at once (`prompts`: PREFILL_BATCH, or
    the batch when smaller; the fewest that the batch the plan then allows still covers). The
    prefill chunk is the longest of 2048 .. 128 tokens per prompt (256 at most without fused
    attention: PREFILL_STEPS_UNFUSED) whose transient stays within an eighth of the budget.
    The buffer cache is bounded at two 256-token KV growth steps of every sequence (at most
    1 GiB). When not even one full-context sequence fits, the context is capped to what does
    (longer prompts get `too_long` instead of exhausting memory). Values given (not None) are
    kept."""
    original = max(1, int(context_length or 2048))
    given = (prefill_step_size, prefix_cache_bytes)
    for ctx in [original] + list(range(original // KV_STEP * KV_STEP, 0, -KV_STEP)):
        for n_prompts in range(prompts(max_batch or cap), 0, -1):  # fewer prompts, more room
            trial = _fit(s, budget_bytes, ctx, n_prompts, fused_attention, *given)
            batch = int(max(1, min(cap, trial[3]))) if max_batch is None else int(max_batch)
            if prompts(batch) > n_prompts:  # that batch would prefill more prompts than counted
                break
            (prefill_step_size, transient, prefix_cache_bytes, fits), chosen = trial, batch
        if fits >= 1:
            break
    cache_limit = int(min(2 * chosen * KV_STEP * kv_bytes_per_token(s), 1 << 30))
    return {
        "budget_bytes": int(budget_bytes),
        "weights_bytes": int(weight_bytes(s)),
        "kv_bytes_per_token": int(kv_bytes_per_token(s)),
        "context_length": ctx,
        "context_capped_from": original if ctx < original else None,
        "max_batch": chosen,
        "prefill_step_size": int(prefill_step_size),
        "prefix_cache_bytes": int(prefix_cache_bytes),
        "cache_limit_bytes": cache_limit,
        "predicted_peak_bytes": int(
            weight_bytes(s) + transient + prefix_cache_bytes + chosen * _kv_with_growth(s, ctx)
        ),
        "full_context_fits": bool(fits >= 1),
    }
