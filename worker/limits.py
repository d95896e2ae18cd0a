"""The worker's memory limits, chosen at start from core/memory.py's model.

By default --max-batch, --prefix-cache-bytes and the prefill chunk follow from the model's
config, the context length and the budget (the smaller of --memory-fraction of the device's
recommended working set and the memory available now, plus the weights this process already
holds); values given on the command line are kept. mlx's buffer cache is bounded
(mx.set_cache_limit), so freed buffers do not pile up over a long run. Because every
sequence of a batch can reach the context length, an admitted request always fits: the
others wait in the queue (or get `overloaded` when it is full).
"""

from core import memory

DEFAULT_MAX_BATCH = memory.WORKER_MAX_BATCH
DEFAULT_PREFIX_CACHE_BYTES = 256 << 20
DEFAULT_PREFILL_STEP = 2048
DEFAULT_CACHE_LIMIT = 256 << 20


def choose(
    config,
    context_length,
    *,
    memory_fraction=0.8,
    max_batch=None,
    prefix_cache_bytes=None,
    prefill_step_size=None,
    log=None,
):
    """The limits (a dict, as `ready` and `stats` report them); sets mlx's cache limit."""
    import mlx.core as mx  # after `import worker` (fast BLAS first)

    try:
        shape = memory.shape_from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        shape, why = None, f"{type(e).__name__}: {e}"
    if shape is None:
        limits = {
            "source": f"defaults (the memory model cannot read this config: {why})",
            "max_batch": max_batch or DEFAULT_MAX_BATCH,
            "prefix_cache_bytes": DEFAULT_PREFIX_CACHE_BYTES
            if prefix_cache_bytes is None
            else prefix_cache_bytes,
            "prefill_step_size": prefill_step_size or DEFAULT_PREFILL_STEP,
            "cache_limit_bytes": DEFAULT_CACHE_LIMIT,
            "context_capped_from": None,
        }
    else:
        budget, why = memory.budget(memory_fraction, held=int(mx.get_active_memory()))
        limits = memory.worker_limits(
            shape,
            budget,
            context_length,
            max_batch=max_batch,
            prefix_cache_bytes=prefix_cache_bytes,
            prefill_step_size=prefill_step_size,
            fused_attention=mx.default_device() != mx.cpu,
        )
        limits["source"] = f"memory model; budget {why}"
        capped = limits["context_capped_from"]
        if capped and log:
            log.warning(
                f"memory: one sequence of the full context ({capped} tokens, "
                f"{limits['kv_bytes_per_token'] * capped / 1e9:.2f} GB of KV) does not fit next "
                f"to the weights in the budget ({why}); the context is capped at "
                f"{limits['context_length']} tokens (longer prompts get too_long): free memory "
                "or raise --memory-fraction for more"
            )
        if not limits["full_context_fits"] and log:
            log.warning(
                f"memory: not even {limits['context_length']} tokens of KV fit next to the "
                f"weights in the budget ({why}); serving with --max-batch 1 anyway"
            )
    mx.set_cache_limit(int(limits["cache_limit_bytes"]))
    return limits
