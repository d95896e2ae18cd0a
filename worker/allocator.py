"""What the allocators under the worker keep after a buffer is freed, and letting it go.

Two caches sit between a freed KV buffer and the system, and both held memory the prefix
cache's budget did not show (docs/MEMORY.md, "The prefix cache's budget"):

- glibc's malloc (Linux). A block of 128 KiB or more is mmap()ed and returned on free, until
  the first such block is freed: glibc then raises its mmap threshold to that block's size
  (up to 32 MiB) and its trim threshold to twice that, so every later KV buffer below it
  came from the heap and stayed resident when freed. `configure()` pins the threshold
  (mallopt(M_MMAP_THRESHOLD), which also turns the dynamic raise off); smaller blocks freed
  in the middle of the heap are given back by `trim()` (malloc_trim), which the prefix cache
  calls after evicting. Elsewhere (macOS, musl) both are no-ops: on a Mac the KV buffers are
  Metal buffers, outside malloc.
- mlx's buffer cache keeps freed buffers for reuse by size (within 2 pages), up to its limit
  (worker/limits.py). A batch's KV buffers have the batch's length: a multiple of 256
  tokens without the prefix cache, but the cached length plus whatever was processed after a
  hit, which no later batch matches. They sat in the cache up to its limit.
  `release_batch_buffers()` frees them when sequences leave the batch (mlx-lm's
  BatchGenerator already clears the cache after every prefill chunk).
"""

import ctypes
import ctypes.util
import sys

import mlx.core as mx

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value, kept instead of raised

_libc = None


def _glibc():
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.gnu_get_libc_version.restype = ctypes.c_char_p
                libc.gnu_get_libc_version()
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _libc = libc
            except (OSError, AttributeError):
                _libc = False
    return _libc or None


def configure(log=None):
    """Pin glibc's mmap threshold (and with it the trim threshold) at their starting values, so
    freed KV buffers go back to the system. Returns what was done (also logged), or None where
    the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return None
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) == 1 and ok
    if ok:
        note = f"glibc: blocks of {MMAP_THRESHOLD >> 10} KiB or more are mmap()ed and returned on free"
    else:
        note = "glibc: mallopt refused the thresholds (left as they were)"
    if log:
        log.info(f"memory: {note}")
    return note


def trim():
    """Give the free pages inside glibc's heaps back to the system (malloc_trim); a no-op
    elsewhere. Returns True when memory was released."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def release_batch_buffers():
    """Free what mlx's buffer cache holds (the batch buffers of sequences that just left)."""
    mx.clear_cache()


def memory_figures(gpu=None, rss=None):
    """`stats.memory`: the process's RSS and mlx's counters, and `resident_bytes`, what the
    worker really holds. On the CPU backend mlx's buffers are malloc()ed, inside the RSS:
    resident = RSS. On a GPU backend (Metal, CUDA) they are not in the RSS (Metal buffers
    are not counted there on macOS, CUDA's live on the device): resident = RSS + mlx's active
    and cached bytes. gpu, rss: the backend and the RSS as measured (None: this process)."""
    if gpu is None:
        gpu = mx.default_device() != mx.cpu
    if rss is None:
        try:
            import psutil

            rss = int(psutil.Process().memory_info().rss)
        except Exception:
            rss = 0
    active, cache = int(mx.get_active_memory()), int(mx.get_cache_memory())
    return {
        "rss_bytes": rss,
        "active_bytes": active,
        "peak_bytes": int(mx.get_peak_memory()),
        "cache_bytes": cache,
        "resident_bytes": rss + active + cache if gpu else rss,
        "resident_source": "rss+mlx" if gpu else "rss",
    }
