"""The worker's limits from the memory model (core/memory_model.py): the largest batch whose
every sequence may reach the context, the prefill chunk, the prefix cache and mlx's buffer
cache, all within a budget given in bytes (the budget now is core/memory.py's; worker/limits.py
asks for both and applies the result).
"""

from core.memory_model import kv_bytes_per_token, prefill_bytes_per_token, weight_bytes

KV_STEP = 256  # mlx-lm's KV caches grow in steps of 256 tokens
WORKER_MAX_BATCH = 32  # the worker's batch when memory is no limit
PREFILL_BATCH = 8  # mlx-lm BatchGenerator's prefill batch (worker/engine.py)
# Prefill chunk sizes tried, longest first. Without fused attention (the CPU) a chunk computes
# chunk x prefix softmax scores with mlx's scalar exp, the largest cost of a long prompt, so
# short chunks are faster: 256 took 0.82x the time of 1024 on a 1,000-token prompt
# (docs/PERFORMANCE.md, Prefill against the compute roofline).
PREFILL_STEPS = (2048, 1024, 512, 256)
PREFILL_STEPS_UNFUSED = (256,)


def _kv_with_growth(s, ctx):
    """KV bytes of one sequence of ctx tokens as mlx-lm allocates it (256-token steps), plus
    its share of the bounded buffer cache (two growth steps)."""
    return kv_bytes_per_token(s) * (-(-ctx // KV_STEP) * KV_STEP + 2 * KV_STEP)


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
    chunk (PREFILL_BATCH prompts), mlx's buffer cache and the prefix cache (a quarter of what
    is left, at most 1 GiB). The prefill chunk is the longest of 2048 .. 128 tokens per prompt
    (256 at most without fused attention: PREFILL_STEPS_UNFUSED) whose transient stays within an
    eighth of the budget. The buffer cache is bounded at two
    256-token KV growth steps of every sequence (at most 1 GiB). When not even one
    full-context sequence fits, the context is capped to what does (longer prompts get
    `too_long` instead of exhausting memory). Values given (not None) are kept."""
    original = max(1, int(context_length or 2048))
    step_given, prefix_given = prefill_step_size, prefix_cache_bytes
    for ctx in [original] + list(range(original // KV_STEP * KV_STEP, 0, -KV_STEP)):
        per_token = min(PREFILL_BATCH, cap) * prefill_bytes_per_token(s, ctx, fused_attention)
        prefill_step_size = step_given or next(
            (
                n
                for n in (PREFILL_STEPS if fused_attention else PREFILL_STEPS_UNFUSED)
                if n * per_token <= budget_bytes / 8
            ),
            128,
        )
        transient = min(prefill_step_size, ctx) * per_token
        free = budget_bytes - weight_bytes(s) - transient
        prefix_cache_bytes = (
            prefix_given if prefix_given is not None else int(min(max(free // 4, 0), 1 << 30))
        )
        fits = max(0, int((free - prefix_cache_bytes) // _kv_with_growth(s, ctx)))
        if fits < 1 and prefix_given is None:  # capping: the prefix cache goes first
            prefix_cache_bytes = 0
            fits = max(0, int(free // _kv_with_growth(s, ctx)))
        if fits >= 1:
            break
    chosen = int(max(1, min(cap, fits))) if max_batch is None else int(max_batch)
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
