"""The mlx engine: mlx-lm's BatchGenerator (continuous batching) and the prefix cache
(worker/prefix_cache.py), behind the interface the engine-independent loop (worker/engine.py)
drives; a second engine is one file with the same methods (worker/engine_llamacpp.py):
  sampling(temp, top_p, min_p, top_k, rep, seed, echo) -> the engine's sampler objects
  start(ids, sys_end, max_tokens, sampling) -> (uid, prompt tokens served from its cache)
  step() -> [(uid, token, finish_reason)]: one decode step for the batch; "stop" is an
    end-of-sequence token (not text); a finished sequence has left the batch, cached
  end(uids, keep): out of the batch (keep: cache it, as after an answer); reset(): a fresh batch
  warm_up(ids), released() (sequences left this turn), cache_figures() and memory() (stats),
  vocab_size, device (the protocol's `backend`), name

The prefix cache follows mlx_lm.server: the nearest cached prefix is fetched at admission,
the cache is stored at the end of the system-prompt and prompt segments, and at finish.
"""

import mlx.core as mx

from core.worker_budget import prompts as prefill_prompts
from worker import allocator, testhooks
from worker.mlxlm_api import (
    BatchGenerator,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    can_trim_prompt_cache,
    eos_stop_sequences,
    make_logits_processors,
    make_sampler,
    no_stop_sequences,
    trim_prompt_cache,
)
from worker.prefix_cache import PrefixCache


class SeededSampler:
    """make_sampler's chain with its own PRNG key: the same seed gives the same tokens."""

    def __init__(self, seed, temperature, top_p, min_p, top_k):
        self.key = mx.random.key(seed)
        self.inv_temp = 1.0 / temperature
        methods = []
        if 0 < top_p < 1.0:
            methods.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            methods.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            methods.append(lambda x: apply_top_k(x, top_k))
        self.methods = methods

    def __call__(self, logprobs):
        for method in self.methods:
            logprobs = method(logprobs)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inv_temp, key=sub)


class MlxEngine:
    name = "mlx"

    def __init__(
        self, model, tokenizer, *, log, max_batch, prefix_cache_bytes, prefill_step_size, ignore_eos
    ):
        self.model, self.tokenizer, self.log = model, tokenizer, log
        self.max_batch, self.prefill_step_size = max_batch, prefill_step_size
        self.stop_sequences = no_stop_sequences() if ignore_eos else eos_stop_sequences(tokenizer)
        self.prefix = PrefixCache(prefix_cache_bytes)
        self.gen = self._new_generator()
        self.segment_types = {}  # uid -> the prompt segments whose caches are still to store
        self._samplers = {}
        self._processors = {}

    @property
    def vocab_size(self):
        try:
            return int(self.model.args.vocab_size)
        except Exception:
            return len(self.tokenizer)

    @property
    def device(self):
        return "gpu" if mx.default_device() == mx.gpu else "cpu"

    def _new_generator(self):
        return BatchGenerator(
            self.model,
            completion_batch_size=self.max_batch,
            prefill_batch_size=prefill_prompts(self.max_batch),  # the memory model's count
            prefill_step_size=self.prefill_step_size,
            stop_tokens=None,
        )

    def warm_up(self, ids):
        (uid,) = self.gen.insert([ids], max_tokens=[3], stop_sequences=[no_stop_sequences()])
        for _ in range(64):
            _, responses = self.gen.next()
            if any(r.finish_reason for r in responses):
                break
        self.gen.remove([uid])

    def sampling(self, temp, top_p, min_p, top_k, rep, seed, echo=None):
        """(sampler, logits processors) for these settings (None, None: greedy, none)."""
        if temp <= 0:
            sampler = None  # the batch's shared greedy sampler
        elif seed is not None:
            sampler = SeededSampler(seed, temp, top_p, min_p, top_k)
        else:
            key = (temp, top_p, min_p, top_k)  # shared object: batched sampling
            sampler = self._samplers.get(key)
            if sampler is None:
                if len(self._samplers) > 256:
                    self._samplers.clear()
                sampler = self._samplers[key] = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
        processors = None
        if rep != 1.0:
            processors = self._processors.get(rep)
            if processors is None:
                if len(self._processors) > 256:
                    self._processors.clear()
                processors = self._processors[rep] = make_logits_processors(repetition_penalty=rep)
        if echo is not None:
            processors = testhooks.echo_processors(self.tokenizer, echo, processors)
        return sampler, processors

    def start(self, ids, sys_end, max_tokens, sampling):
        """Insert a sequence, from the nearest cached prefix; (uid, prompt tokens cached)."""
        cache, rest = self.prefix.fetch(ids)
        if cache is not None and not rest:
            # An exact hit: recompute the last token so there is something to feed the model.
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, 1)
                rest = ids[-1:]
            else:
                cache, rest = None, ids
        cached = len(ids) - len(rest)
        if cached <= 0:
            cache = None
        if sys_end:
            segments, types = [ids[:sys_end], ids[sys_end:]], ["system", "user"]
        else:
            segments, types = [ids], ["user"]
        n = cached
        while n > 0:
            if n >= len(segments[0]):
                n -= len(segments.pop(0))
                types.pop(0)
            else:
                segments[0] = segments[0][n:]
                break
        sampler, processors = sampling
        (uid,) = self.gen.insert_segments(
            segments=[segments],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[ids[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[self.stop_sequences],
        )
        self.segment_types[uid] = types[::-1]
        return uid, cached

    def step(self):
        """One BatchGenerator step: [(uid, token, finish_reason)]. A finished sequence has left
        the batch, its cache stored; "stop" is the end-of-sequence token (not text)."""
        prompt_responses, responses = self.gen.next()
        if prompt_responses:
            try:
                self._segment_caches(prompt_responses)
            except Exception as e:
                self.log.warning(f"prefix cache insert failed: {type(e).__name__}: {e}")
        out = []
        for r in responses:
            out.append((r.uid, r.token, r.finish_reason))
            if r.finish_reason is not None:
                self.segment_types.pop(r.uid, None)
                self._store(r.prompt_cache, r.all_tokens)
        return out

    def _segment_caches(self, prompt_responses):
        """Store the prompt cache at segment ends (system prompt, prompt minus its last token)."""
        uids = [
            r.uid
            for r in prompt_responses
            if r.end_of_segment and not r.end_of_prompt and self.segment_types.get(r.uid)
        ]
        if not uids:
            return
        caches = self.gen.extract_cache(uids)
        for uid, (cache, tokens) in caches.items():
            self.prefix.insert(list(tokens), cache, self.segment_types[uid].pop())

    def _store(self, cache, tokens, kind="assistant"):
        try:
            if cache is not None and tokens:
                self.prefix.insert(list(tokens), cache, kind)
        except Exception as e:
            self.log.warning(f"prefix cache insert failed: {type(e).__name__}: {e}")

    def end(self, uids, keep=False):
        """Take sequences out of the batch (keep: store their caches, as after an answer)."""
        for uid in uids:
            self.segment_types.pop(uid, None)
        caches = self.gen.remove(uids, return_prompt_caches=keep) or {}
        for cache, tokens in caches.values() if keep else ():
            self._store(cache, tokens)

    def reset(self):
        """A fresh batch after a failure of the whole one."""
        self.segment_types.clear()
        try:
            self.gen.close()
        except Exception:
            pass
        self.gen = self._new_generator()

    def released(self):
        """Sequences left the batch: their buffers, freed, would wait in mlx's buffer cache."""
        allocator.release_batch_buffers()

    def cache_figures(self):
        return {
            "entries": len(self.prefix),
            "bytes": int(self.prefix.nbytes),
            "budget_bytes": self.prefix.budget,
        }

    def memory(self):
        return allocator.memory_figures()
