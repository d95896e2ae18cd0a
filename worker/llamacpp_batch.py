"""The llama.cpp side of the worker's generation loop, in the shape of mlx-lm's BatchGenerator
(insert, next, remove), so the engine-independent loop (protocol, scheduling, stop strings,
detokenisation: worker/engine.py) can drive either engine.

Every `next()` is one llama_decode over worker/llamacpp_seqs.Sequences: one token for each
sequence that is generating, plus a chunk (at most `prefill_step` tokens in all) of the prompts
still being read, as llama-server's continuous batching does. Sampling runs in numpy on each
sequence's logits (greedy, or temperature with top_k / top_p / min_p, a seeded generator per
request when asked, mlx-lm's repetition penalty over the last 20 tokens). A sequence ends at one
of its stop tokens (the end-of-sequence ids; none with ignore_eos) or at max_tokens.

Prefix reuse: a finished sequence stays in the KV cache as a cache entry (up to `cache_slots`,
least recently used evicted); a new prompt starts from the longest common prefix with any
sequence held, copied by llama_memory_seq_cp (shared cells: nothing is recomputed or copied).

A full KV cache fails no sequence that fits alone: the step gives up room until the batch fits
(_make_room: cache entries, then prompt chunks, then the youngest sequence's cells, read again
later), one more llama_decode attempt each time.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from worker.llamacpp_seqs import DecodeError, Sequences, Work

REPETITION_CONTEXT = 20  # mlx-lm's make_repetition_penalty default


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


@dataclass
class Response:
    uid: int
    token: int
    finish_reason: str | None  # "stop" (a stop token, not text), "length" or None


@dataclass(eq=False)
class _Seq:
    uid: int
    slot: int
    ids: list  # prompt, then generated tokens (the KV cache holds all but the last sampled)
    todo: list  # prompt tokens not yet decoded
    max_tokens: int
    sampling: Sampling
    rng: np.random.Generator
    generated: int = 0
    logits: np.ndarray | None = None
    cached: int = 0
    stop_ids: frozenset = field(default_factory=frozenset)


class LlamaCppBatch:
    def __init__(
        self, gguf, *, n_ctx, max_batch, stop_ids, threads=None, lora=None, cache_slots=8, prefill_step=512
    ):
        self.max_batch, self.cache_slots, self.prefill_step = max_batch, cache_slots, prefill_step
        self.seqs = Sequences(
            gguf,
            n_ctx=n_ctx,
            slots=max_batch + cache_slots,
            threads=threads,
            n_batch=prefill_step + max_batch,
            lora=lora,
        )
        self.stop_ids = frozenset(stop_ids)
        self.free = list(range(max_batch + cache_slots))
        self.live = {}  # uid -> _Seq
        self.cache = OrderedDict()  # slot -> token ids held (least recently used first)
        self.next_uid = 0
        self.hits = self.misses = self.preempted = 0
        self.waiting = set()  # uids that gave up room: they read again once a sequence ends
        self.shared = np.random.default_rng()

    # ---------------------------------------------------------------- requests
    def insert(self, ids, max_tokens, sampling=None, stop_ids=None):
        """A new sequence; its uid. Starts from the longest prefix held in the KV cache."""
        if len(self.live) >= self.max_batch:
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        sampling = sampling or Sampling()
        slot = self._take_slot()
        src, n = self._longest_prefix(ids)
        n = min(n, len(ids) - 1)  # the last prompt token is decoded again: its logits start the answer
        if n > 0:
            self.seqs.copy_prefix(src, slot, n)
            if src in self.cache:
                self.cache.move_to_end(src)
            self.hits += 1
        else:
            self.misses += 1
        rng = np.random.default_rng(sampling.seed) if sampling.seed is not None else self.shared
        uid, self.next_uid = self.next_uid, self.next_uid + 1
        stops = self.stop_ids if stop_ids is None else frozenset(stop_ids)
        self.live[uid] = _Seq(
            uid, slot, list(ids), list(ids[n:]), max_tokens, sampling, rng, cached=n, stop_ids=stops
        )
        return uid

    def cached_tokens(self, uid):
        return self.live[uid].cached

    def remove(self, uids, keep=False):
        """Take sequences out of the batch; keep: hold their tokens as a cache entry."""
        for uid in uids:
            seq = self.live.pop(uid, None)
            if seq is None:
                continue
            self.waiting.clear()  # cells are freed: whoever waited for room may try again
            held = len(seq.ids) - len(seq.todo) - (1 if seq.logits is not None and seq.generated else 0)
            if keep and self.cache_slots and held > 0 and not seq.todo:
                self.seqs.drop(seq.slot, held)  # positions past what is decoded
                self.cache[seq.slot] = seq.ids[:held]
                self._evict(self.cache_slots)
            else:
                self.seqs.drop(seq.slot)
                self.free.append(seq.slot)

    # ---------------------------------------------------------------- decoding
    def next(self):
        """One llama_decode for the whole batch; the tokens sampled in it."""
        steps, chunks = self._plan()
        if not steps and not chunks:
            return []
        logits, chunks = self._decode(steps, chunks)
        for seq, w in chunks:
            seq.todo = seq.todo[len(w.tokens) :]
        by_slot = {s.slot: s for s in self.live.values()}
        out = []
        for slot, row in logits.items():
            seq = by_slot[slot]
            token = self._sample(seq, row)
            seq.ids.append(token)
            seq.generated += 1
            seq.logits = row
            if token in seq.stop_ids:
                out.append(Response(seq.uid, token, "stop"))
            else:
                out.append(Response(seq.uid, token, "length" if seq.generated >= seq.max_tokens else None))
        return out

    def _plan(self):
        """([(seq, Work)] one token for each generating sequence, [(seq, Work)] prompt chunks of at
        most prefill_step tokens in all, oldest sequence first). A sequence that gave up its cells
        for lack of room reads again only once a sequence has ended (else it would take the cells
        back and lose them again), or when no sequence is generating."""
        generating = any(not s.todo for s in self.live.values())
        steps, chunks, budget = [], [], self.prefill_step
        for seq in self.live.values():  # insertion order: oldest first
            if not seq.todo:
                steps.append((seq, Work(seq.slot, [seq.ids[-1]], len(seq.ids) - 1)))
            elif budget > 0 and not (generating and seq.uid in self.waiting):
                chunk = seq.todo[:budget]
                budget -= len(chunk)
                pos = len(seq.ids) - len(seq.todo)
                chunks.append((seq, Work(seq.slot, chunk, pos, logits=len(chunk) == len(seq.todo))))
        return steps, chunks

    def _decode(self, steps, chunks):
        """(logits by slot, the prompt chunks decoded). When the KV cache has no room for the
        batch, room is made one give-up at a time (_make_room) until it fits."""
        while True:
            try:
                return self.seqs.decode([w for _, w in steps + chunks]), chunks
            except DecodeError:
                for _, w in steps + chunks:  # the failed call may have kept part of the batch
                    self.seqs.drop(w.seq, w.pos)
                if not self._make_room(steps, chunks):
                    raise

    def _make_room(self, steps, chunks):
        """Give up one thing for room in the KV cache, cheapest first: the cache entries; a
        prompt chunk (it waits, its sequence keeps its cells), youngest first; then the cells of
        the youngest sequence holding some - a partly read prompt or a generating sequence, read
        again later (vLLM's preemption by recomputation: its prompt and the tokens generated so
        far; its answer goes on unchanged). The oldest sequence in the batch never yields, so
        it always advances and, ending, frees room. False when nothing is left to give up: that
        sequence alone does not fit (a prompt and answer longer than the KV cache)."""
        if self.cache:
            self._evict(0)
            return True
        if chunks and len(steps) + len(chunks) > 1:
            seq, _ = max(chunks, key=lambda c: c[0].uid)
            self._wait(seq, steps, chunks)
            return True
        oldest = min(seq.uid for seq, _ in steps + chunks)
        holders = [s for s in self.live.values() if s.uid != oldest and len(s.ids) > len(s.todo)]
        if not holders:
            return False
        seq = max(holders, key=lambda s: s.uid)
        self.seqs.drop(seq.slot)
        seq.todo = list(seq.ids)  # its last token's logits will be those a step would give
        self.preempted += 1
        self._wait(seq, steps, chunks)
        return True

    def _wait(self, seq, steps, chunks):
        steps[:] = [(s, w) for s, w in steps if s is not seq]
        chunks[:] = [(s, w) for s, w in chunks if s is not seq]
        self.waiting.add(seq.uid)

    def _sample(self, seq, logits):
        s = seq.sampling
        if s.repetition_penalty != 1.0:
            logits = logits.copy()
            recent = np.unique(np.array(seq.ids[-REPETITION_CONTEXT:], dtype=np.int64))
            picked = logits[recent]
            logits[recent] = np.where(
                picked < 0, picked * s.repetition_penalty, picked / s.repetition_penalty
            )
        if s.temperature <= 0:
            return int(np.argmax(logits))
        logp = logits.astype(np.float64) - logits.max()
        logp -= np.log(np.exp(logp).sum())
        keep = np.ones(logp.shape, dtype=bool)
        order = np.argsort(-logp)
        if 0 < s.top_k < len(logp):
            keep[order[s.top_k :]] = False
        if 0 < s.top_p < 1.0:
            cum = np.cumsum(np.exp(logp[order]))
            cut = np.searchsorted(cum, s.top_p) + 1  # the smallest set whose mass reaches top_p
            keep[order[cut:]] = False
        if s.min_p > 0:
            keep &= logp >= logp.max() + np.log(s.min_p)
        scaled = np.where(keep, logp / s.temperature, -np.inf)
        p = np.exp(scaled - scaled.max())
        return int(seq.rng.choice(len(p), p=p / p.sum()))

    # ---------------------------------------------------------------- the KV cache
    def _take_slot(self):
        if not self.free:
            self._evict(len(self.cache) - 1)
        return self.free.pop()

    def _evict(self, keep):
        while len(self.cache) > keep:
            slot, _ = self.cache.popitem(last=False)
            self.seqs.drop(slot)
            self.free.append(slot)

    def _longest_prefix(self, ids):
        best, n = None, 0
        held = [(slot, t) for slot, t in self.cache.items()]
        held += [(s.slot, s.ids[: len(s.ids) - len(s.todo) - 1]) for s in self.live.values() if not s.todo]
        for slot, tokens in held:
            m = _common(tokens, ids)
            if m > n:
                best, n = slot, m
        return best, n

    def stats(self):
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self.cache),
            "tokens": sum(map(len, self.cache.values())),
            "preempted": self.preempted,
        }

    def close(self):
        self.seqs.close()


def _common(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
