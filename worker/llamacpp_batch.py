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
        self.hits = self.misses = 0
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
        steps, chunks, budget = [], [], self.prefill_step
        for seq in self.live.values():
            if seq.todo:
                if budget > 0:
                    chunk = seq.todo[:budget]
                    budget -= len(chunk)
                    pos = len(seq.ids) - len(seq.todo)
                    chunks.append((seq, Work(seq.slot, chunk, pos, logits=len(chunk) == len(seq.todo))))
            elif seq.logits is not None:
                steps.append(Work(seq.slot, [seq.ids[-1]], len(seq.ids) - 1))
        if not steps and not chunks:
            return []
        logits, prefilled = self._decode(steps, [w for _, w in chunks])
        for seq, w in chunks[:prefilled]:
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

    def _decode(self, steps, chunks):
        """(logits by slot, how many of the prompt chunks were decoded). With no room in the KV
        cache the cache entries are given up; if there is still none, newcomers' prompt chunks wait
        for a later step (sequences that finish free their cells) and only the generating
        sequences decode. Only when those alone do not fit is it an error."""
        attempts = [chunks] + ([chunks] if self.cache else []) + ([[]] if chunks and steps else [])
        for i, attempt in enumerate(attempts):
            try:
                return self.seqs.decode(steps + attempt), len(attempt)
            except DecodeError:
                if i == len(attempts) - 1:
                    raise
                for w in steps + attempt:  # the failed call may have kept part of the batch
                    self.seqs.drop(w.seq, w.pos)
                self._evict(0)

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
        }

    def close(self):
        self.seqs.close()


def _common(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
