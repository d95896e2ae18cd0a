"""The prefix cache's byte budget is true (worker/prefix_cache.py, worker/allocator.py).

- What the cache counts covers what its entries hold: mlx's active memory and the Python
  allocations (tracemalloc) that inserting entries adds are at most the counted bytes, and
  the count is not wildly above them.
- A hit allocates nothing (the batch gets views of the entry), and what the batch does to its
  copy never reaches the entry.
- Evicted entries are freed to the system, not into mlx's buffer cache; emptying the cache
  gives all of its memory back.
- glibc: a freed large block no longer raises the mmap threshold (the cause of most of the
  growth), shown in a fresh process with and without allocator.configure().
- `stats.memory.resident_bytes` adds mlx's buffers to the RSS on GPU backends only.

The soak through the real worker (the budget against RSS) is in test_reliability_worker.py.
"""

import gc
import random
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import worker  # noqa: E402, F401  (fast BLAS before mlx)

# isort: split
import mlx.core as mx  # noqa: E402

from worker import allocator  # noqa: E402
from worker.mlxlm_api import KVCache  # noqa: E402
from worker.prefix_cache import PrefixCache, entry_cost  # noqa: E402

# the tiny model's KV shape: 4 layers, 2 KV heads of 32, float32 (2 KiB per token)
LAYERS, HEADS, DIM = 4, 2, 32
SYSTEM = list(range(300, 300 + 180))  # a shared system prompt, token ids beyond the small ints


def kv(n_tokens, seed=0):
    """One entry's cache: a KVCache per layer holding n_tokens, evaluated (as extract() makes)."""
    mx.random.seed(seed)
    out = []
    for _ in range(LAYERS):
        c = KVCache()
        c.keys = mx.random.normal((1, HEADS, n_tokens, DIM))
        c.values = mx.random.normal((1, HEADS, n_tokens, DIM))
        c.offset = n_tokens
        mx.eval(c.keys, c.values)
        out.append(c)
    return out


def conversation(rnd, i):
    """Tokens of a chatbot prompt: the system prompt, then a question of its own."""
    return SYSTEM + [1000 + rnd.randrange(30000) for _ in range(rnd.randint(10, 60))] + [i + 40000]


def test_the_count_covers_arrays_and_bookkeeping():
    rnd = random.Random(1)
    cache = PrefixCache(1 << 30)
    gc.collect()
    mx.clear_cache()
    active0 = mx.get_active_memory()
    tracemalloc.start()
    try:
        for i in range(60):
            tokens = conversation(rnd, i)  # made while traced: its ints count too
            assert cache.insert(tokens, kv(len(tokens), seed=i), "assistant")
        del tokens
        gc.collect()  # the cache's references are the only ones left
        python_bytes, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arrays = mx.get_active_memory() - active0
    held = arrays + python_bytes
    counted = cache.nbytes
    print(f"\nPREFIX_CACHE counted {counted} arrays {arrays} python {python_bytes} ({counted / held:.3f}x)")
    assert len(cache) == 60 and cache.evicted == 0
    assert held <= counted, (held, counted)
    assert counted <= 1.35 * held, (held, counted)  # an upper bound, not a guess far above


def test_a_hit_allocates_nothing_and_the_batch_cannot_change_the_entry():
    cache = PrefixCache(64 << 20)
    tokens = SYSTEM + [5000, 5001, 5002]
    assert cache.insert(tokens, kv(len(tokens)), "user")
    mx.clear_cache()
    active = mx.get_active_memory()
    got, rest = cache.fetch(tokens + [7, 8])  # the stored prefix and two new tokens
    mx.eval([a for c in got for a in (c.keys, c.values)])
    assert rest == [7, 8] and type(got[0]) is KVCache and got[0].offset == len(tokens)
    assert mx.get_active_memory() == active  # views of the entry, no copy
    got[0].trim(10)  # what the engine does on an exact hit, and mlx-lm for a longer entry
    got[0].keys[..., :5, :] = 0.0  # an in-place write on the batch's side
    again, rest = cache.fetch(tokens + [7, 8])
    assert again[0].offset == len(tokens) and rest == [7, 8]
    assert mx.abs(again[0].keys[..., :5, :]).sum().item() > 0  # the entry is unchanged


def test_within_budget_evicting_and_freed_past_mlx_buffer_cache():
    rnd = random.Random(2)
    budget = 4 << 20
    cache = PrefixCache(budget)
    mx.clear_cache()
    active0 = mx.get_active_memory()
    for i in range(80):
        tokens = conversation(rnd, i)
        assert cache.insert(tokens, kv(len(tokens), seed=i), "assistant")
        assert 0 < cache.nbytes <= budget
        # evicted entries went to the system: mlx's buffer cache holds none of their buffers
        # (each >= 48 KiB; what it may hold is kv()'s own small temporaries)
        assert mx.get_cache_memory() < 16 << 10, (i, mx.get_cache_memory())
    assert cache.evicted > 40 and cache.freed > 0
    assert len(cache) < 40
    assert not cache.insert(list(range(5000)), kv(5000), "user")  # larger than the budget: refused
    cache.clear()
    gc.collect()
    assert len(cache) == 0 and cache.nbytes == 0
    assert mx.get_active_memory() == active0  # nothing pinned by what was evicted
    assert entry_cost([1] * 10, kv(10)) > 10 * 2 * LAYERS * HEADS * DIM * 4


def test_only_plain_kv_caches_are_kept_and_a_zero_budget_keeps_nothing():
    class Other(KVCache):
        pass

    c = kv(20)
    odd = [Other() for _ in c]
    for o, k in zip(odd, c):
        o.keys, o.values, o.offset = k.keys, k.values, k.offset
    cache = PrefixCache(1 << 20)
    assert not cache.insert(list(range(20)), odd, "user")
    assert not PrefixCache(0).insert(list(range(20)), c, "user")
    assert PrefixCache(0).fetch([1, 2, 3]) == (None, [1, 2, 3])


GLIBC_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    import psutil
    sys.path.insert(0, sys.argv[2])
    from worker import allocator
    if sys.argv[1] == "configured":
        assert allocator.configure()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    rss = lambda: psutil.Process().memory_info().rss
    big = libc.malloc(16 << 20)  # one large buffer freed (a batch's KV, the logits...)
    ctypes.memset(big, 1, 16 << 20)
    libc.free(big)
    before = rss()
    blocks = [libc.malloc(1 << 20) for _ in range(100)]  # then KV-sized buffers
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    for b in blocks[:-1]:  # all freed but the last (it keeps the heap's top in place)
        libc.free(b)
    print((rss() - before) >> 20)
    """
)


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only (mallopt); a no-op elsewhere")
def test_glibc_keeps_freed_kv_buffers_unless_configured():
    def kept(mode):
        out = subprocess.run(
            [sys.executable, "-c", GLIBC_PROBE, mode, str(ROOT)], capture_output=True, text=True, check=True
        )
        return int(out.stdout.split()[-1])

    default, configured = kept("default"), kept("configured")
    print(f"\nGLIBC MiB still resident after freeing 99 of 100 1-MiB blocks: {default} -> {configured}")
    assert default >= 90  # the cause: the threshold rose to 16 MiB, the blocks came from the heap
    assert configured <= 5  # mmap()ed, returned on free


def test_resident_memory_adds_mlx_buffers_on_gpu_backends_only():
    cpu = allocator.memory_figures(gpu=False, rss=100 << 20)
    gpu = allocator.memory_figures(gpu=True, rss=100 << 20)
    assert cpu["resident_bytes"] == 100 << 20 and cpu["resident_source"] == "rss"
    assert gpu["resident_source"] == "rss+mlx"
    assert gpu["resident_bytes"] == (100 << 20) + gpu["active_bytes"] + gpu["cache_bytes"]
    here = allocator.memory_figures()  # this machine's backend, its own RSS
    assert here["rss_bytes"] > 0 and here["resident_source"] == (
        "rss" if mx.default_device() == mx.cpu else "rss+mlx"
    )
