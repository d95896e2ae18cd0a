"""llama.cpp sequences decoded together: one llama.cpp context, up to `slots` sequences, each
llama_decode call carrying every sequence's next tokens (prompt chunks and single decode tokens
mixed, as llama.cpp's examples/parallel and llama-server batch them), through the low-level
bindings (llama-cpp-python's Llama class decodes one sequence at a time).

The KV cache is unified (kv_unified): sequences share its cells, so a prefix copied from one
sequence to another (llama_memory_seq_cp) is stored once, not copied - the shared system prompt
of a chatbot costs its cells one time. Token ids in, logits out; sampling, stop rules and the
protocol are the engine-independent worker's.
"""

import ctypes
import time
from dataclasses import dataclass

import numpy as np

from core.llamacpp import quiet_stderr, require


class DecodeError(RuntimeError):
    """llama_decode failed (status: 1 = no room in the KV cache for the batch, <0 = error)."""


@dataclass
class Work:
    """Tokens to append to one sequence at positions pos, pos+1, ...; logits of the last wanted."""

    seq: int
    tokens: list
    pos: int
    logits: bool = True


class Sequences:
    def __init__(self, model_path, n_ctx, slots, threads=None, n_batch=512, lora=None, lora_scale=1.0):
        self.lc = lc = require()
        self.slots, self.n_batch = slots, n_batch
        lc.llama_backend_init()
        with quiet_stderr():
            self.model = lc.llama_model_load_from_file(
                str(model_path).encode(), lc.llama_model_default_params()
            )
        if not self.model:
            raise ValueError(f"{model_path}: llama.cpp could not load this GGUF file")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        m = self.model  # K and V, float16, per layer and key-value head
        head_dim = lc.llama_model_n_embd(m) // lc.llama_model_n_head(m)
        self.kv_bytes_per_token = 2 * 2 * lc.llama_model_n_layer(m) * lc.llama_model_n_head_kv(m) * head_dim
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
        params.n_seq_max, params.kv_unified = slots, True
        params.n_threads = params.n_threads_batch = threads or params.n_threads
        with quiet_stderr():
            self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise ValueError(f"{model_path}: llama.cpp could not make a context of {n_ctx} tokens")
        self.n_ctx = lc.llama_n_ctx(self.ctx)
        self.memory = lc.llama_get_memory(self.ctx)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)
        self.adapter = None
        self.decode_s = 0.0  # seconds spent inside llama_decode (the rest of a step is Python's)
        if lora:
            self.set_lora(lora, lora_scale)

    def set_lora(self, path, scale=1.0):
        """A GGUF-LoRA adapter (llama.cpp's convert_lora_to_gguf format) applied to every sequence."""
        lc = self.lc
        with quiet_stderr():
            adapter = lc.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise ValueError(f"{path}: llama.cpp could not load this LoRA adapter")
        adapters = (lc.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        with quiet_stderr():
            status = lc.llama_set_adapters_lora(self.ctx, adapters, 1, scales)
        if status != 0:
            raise ValueError(f"{path}: llama.cpp could not apply this LoRA adapter")
        self.adapter = adapter

    def decode(self, work):
        """Append each Work's tokens to its sequence, in llama_decode calls of at most n_batch
        tokens; {seq: logits of its last token (float32 [n_vocab])} for the Work that want them."""
        out, pending, filled = {}, [], 0
        b = self.batch
        for w in work:
            for i, token in enumerate(w.tokens):
                if filled == self.n_batch:
                    out.update(self._run(filled, pending))
                    pending, filled = [], 0
                last = i == len(w.tokens) - 1
                b.token[filled], b.pos[filled], b.n_seq_id[filled] = token, w.pos + i, 1
                b.seq_id[filled][0] = w.seq
                b.logits[filled] = last and w.logits
                if last and w.logits:
                    pending.append((w.seq, filled))
                filled += 1
        if filled:
            out.update(self._run(filled, pending))
        return out

    def _run(self, n, pending):
        self.batch.n_tokens = n
        tic = time.perf_counter()
        status = self.lc.llama_decode(self.ctx, self.batch)
        self.decode_s += time.perf_counter() - tic
        if status != 0:
            raise DecodeError(f"llama_decode returned {status} for {n} tokens")
        return {seq: self._logits(i) for seq, i in pending}

    def _logits(self, i):
        ptr = self.lc.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # the KV cache, per sequence
    def copy_prefix(self, src, dst, n):
        """Sequence dst gets src's first n positions (shared cells: nothing is recomputed)."""
        self.lc.llama_memory_seq_cp(self.memory, src, dst, 0, n)

    def drop(self, seq, start=0):
        """Forget seq's positions from `start` on (all of it by default)."""
        return bool(self.lc.llama_memory_seq_rm(self.memory, seq, start, -1))

    def length(self, seq):
        """Positions held for seq (0 when none)."""
        return int(self.lc.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def close(self):
        with quiet_stderr():  # llama.cpp reports its buffers as it frees them
            self._free()

    def _free(self):
        lc = self.lc
        if getattr(self, "ctx", None):
            lc.llama_batch_free(self.batch)
            lc.llama_free(self.ctx)
            self.ctx = None
        if self.adapter:
            lc.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if getattr(self, "model", None):
            lc.llama_model_free(self.model)
            self.model = None
