"""Independent references for a GGUF 'llama' model, written from llama.cpp's conventions with
numpy and llama.cpp's own `gguf` package (GGUFReader, gguf.quants.dequantize), sharing no code
with train/ (the converter uses mlx's GGUF reader):

- llama_cpp_forward: the forward pass as llama.cpp computes it, on the file's tensors as stored
  (q/k rows in llama.cpp's permuted order, rotary embedding on adjacent pairs);
- BPETokenizer: llama.cpp's byte-level BPE with the "smollm" pre-tokenizer (each digit alone,
  then GPT-2's split), from the file's tokens and merges. It differs from the tokenizer SmolLM2
  was trained with (Hugging Face's `tokenizers`) in two corners, and rules="hf" follows the
  original there: llama.cpp isolates every numeral (Unicode category N: ½ ² ① ٣), Hugging Face's
  Digits pre-tokenizer only 0-9; and a byte the vocabulary has no token for (SmolLM2 lacks 21)
  is dropped by llama.cpp after the merges (so it keeps its neighbours apart), by Hugging Face's
  BPE before them.
"""

import numpy as np
import regex

# llama.cpp (llama-vocab.cpp), LLAMA_VOCAB_PRE_TYPE_SMOLLM: applied in turn; text a pattern
# does not match stays a piece of its own (llama.cpp's unicode_regex_split).
DIGITS = {"llama.cpp": r"\p{N}", "hf": r"[0-9]"}
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def fields(reader, prefix=""):
    return {k: reader.fields[k].contents() for k in reader.fields if k.startswith(prefix)}


def dequantized(reader):
    """{tensor name: float32 array, rows x columns as llama.cpp multiplies them}."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        out[t.name] = w.reshape([int(x) for x in reversed(t.shape)])
    return out


def llama_cpp_forward(reader, ids, rope="norm", weights=None):
    """Logits [T, vocab] of a GGUF 'llama' model as llama.cpp computes them (RMS norm, rotary
    embedding on adjacent pairs - LLAMA_ROPE_TYPE_NORM - grouped-query attention, SwiGLU; the
    embedding as output when the file has no output tensor). rope="neox" rotates halves
    instead: the wrong convention for these files, to show a check can fail."""
    f = fields(reader, "llama.")
    w = dequantized(reader) if weights is None else weights
    n_head, n_kv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    eps, theta = f["llama.attention.layer_norm_rms_epsilon"], f["llama.rope.freq_base"]
    dim = f["llama.rope.dimension_count"]
    norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g
    T = len(ids)
    freqs = theta ** (-np.arange(0, dim, 2) / dim)
    angles = np.arange(T)[:, None] * freqs[None, :]
    # float32 throughout, as llama.cpp computes (float64 here would convert every weight per call)
    cos, sin = (f(angles)[:, None, :].astype(np.float32) for f in (np.cos, np.sin))

    def rotate(x):  # x: [T, heads, dim]
        if rope == "norm":
            a, b = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
            return out
        a, b = x[..., : dim // 2], x[..., dim // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    x = w["token_embd.weight"][ids]
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(f["llama.block_count"]):
        p = lambda n, i=i: w[f"blk.{i}.{n}.weight"]
        h = norm(x, p("attn_norm"))
        q = rotate((h @ p("attn_q").T).reshape(T, n_head, dim))
        k = rotate((h @ p("attn_k").T).reshape(T, n_kv, dim))
        v = (h @ p("attn_v").T).reshape(T, n_kv, dim)
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / float(dim) ** 0.5 + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(T, n_head * dim) @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    assert x.dtype == np.float32
    return norm(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def byte_alphabet():
    """GPT-2's reversible map of the 256 bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


class BPETokenizer:
    """Byte-level BPE as llama.cpp runs it: split the text with the pre-tokenizer's patterns,
    map each piece's UTF-8 bytes to characters, merge the lowest-ranked adjacent pair (leftmost
    first) until no pair has a rank, look the symbols up in the vocabulary (dropping a byte it
    lacks). rules="hf": the two differences of the original tokenizer (module docstring)."""

    def __init__(self, reader, rules="llama.cpp"):
        f = fields(reader, "tokenizer.ggml.")
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
        self.vocab = {t: i for i, t in enumerate(f["tokenizer.ggml.tokens"])}
        self.tokens = f["tokenizer.ggml.tokens"]
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(f["tokenizer.ggml.merges"])}
        self.bytes = byte_alphabet()
        self.unbytes = {c: b for b, c in self.bytes.items()}
        self.missing_bytes = {b for b, c in self.bytes.items() if c not in self.vocab}
        self.patterns = [regex.compile(DIGITS[rules]), regex.compile(GPT2_SPLIT)]
        self.drop_first = rules == "hf"

    def split(self, text):
        pieces = [text]
        for pattern in self.patterns:
            out = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos : m.start()])
                    out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def bpe(self, piece):
        symbols = [self.bytes[b] for b in piece.encode("utf-8")]
        if self.drop_first:
            symbols = [s for s in symbols if s in self.vocab]
        while len(symbols) > 1:
            pairs = [(self.ranks.get(p, np.inf), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == np.inf:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return [self.vocab[s] for s in symbols if s in self.vocab]

    def encode(self, text):
        return [i for piece in self.split(text) for i in self.bpe(piece)]

    def decode(self, ids):
        return bytes(self.unbytes[c] for i in ids for c in self.tokens[i]).decode("utf-8", "replace")
