"""The llama.cpp engine: worker/llamacpp_batch.py (llama.cpp sequences in one batch, the KV
cache's prefixes reused) behind the interface worker/engine.py drives (worker/engine_mlx.py is
the reference). Prompts arrive as token ids rendered by core/prompt.py with the model folder's
own tokenizer: llama.cpp never templates or tokenizes them.

The GGUF: a fused model's (make fuse), or a base's with the adapter converted to GGUF-LoRA
(make gguf-lora). load() checks that llama.cpp's vocabulary gives the tokenizer's ids.
"""

import os
from pathlib import Path

from worker.llamacpp_batch import LlamaCppBatch, Sampling

PROBE = "Olá! Em que ano foi fundado o Sporting Clube Farense? 1910 – «São Luís» 🙂"
CACHE_SLOTS = 8  # finished sequences kept in the KV cache for prefix reuse (least recently used out)


class LlamaCppEngine:
    name = "llamacpp"
    device = "cpu"  # the protocol's `backend`: llama.cpp here is built for the CPU

    def __init__(
        self,
        gguf,
        tokenizer,
        *,
        log,
        max_batch,
        n_ctx,
        ignore_eos,
        lora=None,
        threads=None,
        cache_slots=CACHE_SLOTS,
    ):
        self.tokenizer, self.log = tokenizer, log
        eos = set(getattr(tokenizer, "eos_token_ids", None) or []) | {tokenizer.eos_token_id}
        self.batch = LlamaCppBatch(
            gguf,
            n_ctx=n_ctx,
            max_batch=max_batch,
            stop_ids=() if ignore_eos else sorted(i for i in eos if i is not None),
            threads=threads or os.cpu_count(),
            lora=lora,
            cache_slots=cache_slots,
        )
        self.vocab_size = self.batch.seqs.n_vocab
        # the cache entries live in the one KV cache: its size is their budget (shared with the batch)
        self.kv_budget = n_ctx * self.batch.seqs.kv_bytes_per_token

    def warm_up(self, ids):
        uid = self.batch.insert(ids, 3)
        for _ in range(64):
            if any(r.finish_reason for r in self.batch.next()):
                break
        self.batch.remove([uid])

    def sampling(self, temp, top_p, min_p, top_k, rep, seed, echo=None):
        if echo is not None:
            self.log.warning("WORKER_TEST_ECHO is not supported by the llama.cpp engine: ignored")
        return Sampling(temp, top_p, top_k, min_p, rep, seed)

    def start(self, ids, sys_end, max_tokens, sampling):
        uid = self.batch.insert(ids, max_tokens, sampling)
        return uid, self.batch.cached_tokens(uid)

    def step(self):
        out = []
        for r in self.batch.next():
            out.append((r.uid, r.token, r.finish_reason))
            if r.finish_reason is not None:
                self.batch.remove([r.uid], keep=True)
        return out

    def end(self, uids, keep=False):
        self.batch.remove(uids, keep=keep)

    def reset(self):
        self.batch.remove(list(self.batch.live))

    def released(self):
        pass

    def cache_figures(self):
        stats = self.batch.stats()
        held = stats["tokens"] * self.batch.seqs.kv_bytes_per_token
        return {"entries": stats["entries"], "bytes": held, "budget_bytes": self.kv_budget}

    def memory(self):
        from worker import allocator

        return allocator.memory_figures(gpu=False)


def build(args, settings, context_length, log, config):
    """The engine for `python -m worker --engine llamacpp`: (engine, limits). Raises
    loading.LoadError (exit 2) for a missing llama.cpp, GGUF or a vocabulary that differs."""
    from core import llamacpp
    from worker.loading import LoadError

    try:
        llamacpp.require()
    except llamacpp.NotInstalled as e:
        raise LoadError(str(e)) from None
    gguf = args.gguf or (
        Path(settings.adapter_path) / "fused" / "ggml-model-f16.gguf" if settings.adapter_path else None
    )
    if gguf is None or not Path(gguf).is_file():
        raise LoadError(
            f"--engine llamacpp serves a GGUF: {gguf or 'none given'} is missing (make fuse NAME=... writes "
            "models/NAME/fused/ggml-model-f16.gguf; or --gguf FILE, with --lora-gguf for an adapter)"
        )
    if args.lora_gguf and not Path(args.lora_gguf).is_file():
        raise LoadError(f"--lora-gguf {args.lora_gguf}: no such file (make gguf-lora NAME=... writes it)")
    tokenizer = args.tokenizer
    problem = check_vocabulary(gguf, tokenizer)
    if problem:
        raise LoadError(problem)
    max_batch = args.max_batch or 8
    n_ctx, capped = kv_cells(config, context_length or 4096, max_batch, gguf, args.memory_fraction)
    if capped:
        log.warning(capped)
    engine = LlamaCppEngine(
        gguf,
        tokenizer,
        log=log,
        max_batch=max_batch,
        n_ctx=n_ctx,
        ignore_eos=os.environ.get("WORKER_TEST_IGNORE_EOS") == "1",
        lora=args.lora_gguf,
        cache_slots=0 if args.prefix_cache_bytes == 0 else CACHE_SLOTS,  # 0 disables it, as on mlx
    )
    limits = {
        "max_batch": max_batch,
        "prefix_cache_bytes": engine.kv_budget,
        "prefill_step_size": engine.batch.prefill_step,
        "cache_limit_bytes": 0,
        "source": f"llama.cpp: {Path(gguf).name}{' + ' + Path(args.lora_gguf).name if args.lora_gguf else ''}, "
        f"--max-batch {max_batch}, a KV cache of {n_ctx} tokens ({engine.kv_budget / 2**20:.0f} MiB) shared by the sequences",
    }
    return engine, limits


def kv_cells(config, context, max_batch, gguf, memory_fraction):
    """(KV cache cells, why fewer than wanted or None). Wanted: every sequence's whole context,
    context x max_batch, as llama-server's -c for --parallel. At most what the memory budget
    (core.memory.budget) holds beside the GGUF's weights, and at least one context: a smaller
    cache stays correct (sequences take turns: llamacpp_batch), only slower when it fills."""
    from core import memory
    from core.memory_model import shape_from_config

    want = context * max_batch
    s = shape_from_config(config)
    per_token = 2 * s.layers * s.kv_heads * s.head_dim * 2  # K and V, float16 (llama.cpp's default)
    budget, why = memory.budget(memory_fraction)
    weights = Path(gguf).stat().st_size
    room = max(budget - weights, 0) // per_token
    if room >= want:
        return want, None
    cells = max(context, room // 256 * 256)
    return cells, (
        f"a KV cache of {cells} tokens, not {want} (context {context} x --max-batch {max_batch}): "
        f"the memory budget is {why}, the GGUF's weights {weights / memory.GB:.1f} GB of it; "
        "sequences take turns when it is full (lower --context-length or --max-batch, or raise "
        "--memory-fraction)"
    )


def check_vocabulary(gguf, tokenizer):
    """None when llama.cpp's vocabulary in the GGUF is the model tokenizer's, piece for piece at
    the same ids, and tokenizes a probe text after a control token (as a chat template writes
    it) into the same ids; else why not."""
    from core import llamacpp

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    model = llamacpp.load(gguf, vocab_only=True)
    ids = list(range(len(hf)))
    if model.n_vocab() < len(hf):
        return f"{gguf}: {model.n_vocab()} tokens, the model's tokenizer has {len(hf)}"
    pieces, want = [model._model.token_get_text(i) for i in ids], hf.convert_ids_to_tokens(ids)
    if pieces != want:
        i = next(i for i, (a, b) in enumerate(zip(pieces, want)) if a != b)
        return f"{gguf}: its vocabulary differs from the model's tokenizer (token {i}: {pieces[i]!r} vs {want[i]!r})"
    text = f"{hf.eos_token} {PROBE}"
    got = model.tokenize(text.encode(), add_bos=False, special=True)
    expected = hf.encode(text, add_special_tokens=False)
    if got != expected:
        return f"{gguf}: its vocabulary tokenizes differently from the model's tokenizer ({got[:8]} vs {expected[:8]})"
    return None
