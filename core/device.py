"""What this machine's device gives in memory: its size (Metal/CUDA report theirs; the CPU
backend uses system RAM), what is available now, and the wired limit on Metal. mlx and psutil
are imported inside the functions. The budget made from these is core/memory.py's.
"""

from core.memory_model import GB


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


def available_memory():
    import psutil

    return int(psutil.virtual_memory().available)


def set_wired_limit(log=None):
    """As mlx-lm's trainer does: wire the recommended working set (Metal only; a no-op on
    CPU and CUDA, which report no recommended size). Returns the limit set, or None."""
    import mlx.core as mx

    try:
        size = mx.device_info().get("max_recommended_working_set_size")
    except Exception:
        size = None
    if not size or not mx.metal.is_available():
        return None
    previous = mx.set_wired_limit(int(size))
    if log and previous != int(size):
        log(f"mlx wired limit: {int(size) / GB:.1f} GB (the recommended working set)")
    return int(size)
