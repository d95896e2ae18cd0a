"""The prefix (KV) cache, with a byte budget that bounds the memory it really holds.

mlx-lm's LRUPromptCache (trie, LRU order by type, prefixes dropped when a longer entry
arrives) is kept; what it stores and how it lets go changes, because its own count (the
arrays' `nbytes`) let the worker's resident memory grow to about 2.5x the budget
(docs/MEMORY.md, "The prefix cache's budget"):

- Every hit deep-copied the entry (a full copy of its keys and values) only for the batch to
  copy it again into its own arrays and free the first copy. An entry is now handed out as
  new KVCache objects that share its arrays (views: mlx arrays are values, and the batch
  only reads them), so a hit allocates nothing.
- Evicted entries went back to mlx's buffer cache, where buffers of every entry size piled
  up to the cache's limit, on top of the budget. They are now freed past it
  (`bypass_buffer_cache`), straight to the system allocator.
- An entry's cost is what it holds: each array as allocated (rounded up to whole pages, the
  allocator's header included) plus the cache's Python bookkeeping for it (the token list,
  a trie node per token, the cache objects), an upper bound (ENTRY_BYTES, LAYER_BYTES,
  TOKEN_BYTES, measured in tests/test_prefix_cache.py).

- Evicted arrays below glibc's mmap threshold leave holes in the heap: once a sixteenth of
  the budget (at least 1 MiB) has been freed, the free pages are given back
  (worker/allocator.py, which also covers the rest of the cause: glibc's raised mmap
  threshold, and mlx's buffer cache filling with batch buffers of the cached lengths).
"""

import os
from contextlib import contextmanager

import mlx.core as mx

from worker import allocator
from worker.mlxlm_api import KVCache, LRUPromptCache

KEY = "model"  # one model per worker: one namespace
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
ALLOC_HEADER = 16  # the CPU allocator's size word, rounded to malloc's alignment
# Python bookkeeping, upper bounds (CPython 3.11, 64-bit; checked by tracemalloc in the tests):
# per token a list slot (8), its int (32) and, at worst, a trie node of its own (a dict, 224);
# per layer a KVCache and two array handles; per entry the entry, its list and LRU record.
TOKEN_BYTES = 8 + 32 + 224
LAYER_BYTES = 1024
ENTRY_BYTES = 2048


def array_bytes(a):
    """What an array holds once allocated: its bytes, the allocator's header, whole pages."""
    if not isinstance(a, mx.array):
        return 0
    return -(-(a.nbytes + ALLOC_HEADER) // PAGE) * PAGE


class HeldKVCache(KVCache):
    """A KVCache stored in the prefix cache: `nbytes` is its true cost (see the module's
    doc); a (deep) copy shares its arrays, so handing it to the batch copies nothing."""

    cost = 0

    @classmethod
    def hold(cls, cache, extra=0):
        held = cls()
        held.keys, held.values, held.offset = cache.keys, cache.values, cache.offset
        held.cost = array_bytes(cache.keys) + array_bytes(cache.values) + LAYER_BYTES + extra
        return held

    @property
    def nbytes(self):
        return self.cost

    def __deepcopy__(self, memo):
        out = KVCache()
        # New handles on the same buffers: whatever the batch does to its copy (trim moves
        # the offset; merging reads) never reaches the stored entry.
        out.keys = self.keys[...] if self.keys is not None else None
        out.values = self.values[...] if self.values is not None else None
        out.offset = self.offset
        return out


@contextmanager
def bypass_buffer_cache():
    """Buffers freed inside go back to the system, not into mlx's buffer cache (which keeps
    what is already there): the cache limit is lowered to what it holds for the duration."""
    held = mx.get_cache_memory()
    previous = mx.set_cache_limit(held)
    try:
        yield
    finally:
        mx.set_cache_limit(previous)


def entry_cost(tokens, cache):
    """The bytes an entry of `cache` (a list of KVCache, one per layer) for `tokens` holds."""
    return (
        sum(array_bytes(c.keys) + array_bytes(c.values) + LAYER_BYTES for c in cache)
        + len(tokens) * TOKEN_BYTES
        + ENTRY_BYTES
    )


class PrefixCache:
    """The worker's prefix cache: fetch the nearest cached prefix, insert at segment ends.
    `nbytes` never exceeds `budget` and counts everything an entry keeps alive."""

    def __init__(self, budget):
        self.budget = max(0, int(budget))
        self._lru = LRUPromptCache(max_size=1 << 20, max_bytes=self.budget)
        self.evicted = 0  # entries dropped for room (prefixes replaced by longer ones too)
        self.freed = 0  # their bytes
        self._trim_every = max(self.budget // 16, 1 << 20)
        self._freed_since_trim = 0

    def __len__(self):
        return len(self._lru)

    @property
    def nbytes(self):
        return int(self._lru.nbytes)

    def fetch(self, tokens):
        """(cache or None, the tokens it does not cover), as LRUPromptCache.fetch_nearest_cache."""
        if not self.budget:
            return None, tokens
        return self._lru.fetch_nearest_cache(KEY, tokens)

    def insert(self, tokens, cache, cache_type):
        """Store `cache` (one KVCache per layer) for `tokens`; False when it is not stored
        (the cache is off, the entry is empty, not a plain KVCache, or larger than the budget)."""
        if not self.budget or not tokens or not cache:
            return False
        if not all(type(c) in (KVCache, HeldKVCache) and c.keys is not None for c in cache):
            return False  # other cache kinds (rotating, SSM state) are not accounted: not kept
        tokens = list(tokens)
        if entry_cost(tokens, cache) > self.budget:
            return False
        extra = len(tokens) * TOKEN_BYTES + ENTRY_BYTES
        held = [HeldKVCache.hold(c, extra if i == 0 else 0) for i, c in enumerate(cache)]
        mx.async_eval([a for c in held for a in (c.keys, c.values)])
        n, nbytes = len(self._lru), self._lru.nbytes
        with bypass_buffer_cache():  # what the insert evicts is freed for good
            self._lru.insert_cache(KEY, tokens, held, cache_type=cache_type)
        freed = nbytes + sum(c.cost for c in held) - self._lru.nbytes
        if freed > 0:
            self.evicted += max(0, n + 1 - len(self._lru))
            self.freed += freed
            self._freed_since_trim += freed
            if self._freed_since_trim >= self._trim_every:
                self._freed_since_trim = 0
                allocator.trim()
        return True

    def clear(self):
        with bypass_buffer_cache():
            self._lru.trim_to(n_sequences=0)
