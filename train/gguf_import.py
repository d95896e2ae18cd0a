"""Read a llama-architecture GGUF file (llama.cpp's format) as a Hugging Face llama model.

mlx reads GGUF itself (`mx.load`): Q4_0/Q4_1/Q8_0 tensors come back as mlx affine-quantized
triples (packed weight, scales, biases; group 32) and the metadata as a dict. This module turns
them into what mlx-lm and transformers load:

- tensor names: llama.cpp's (blk.N.attn_q, token_embd, ...) -> Hugging Face llama's
  (model.layers.N.self_attn.q_proj, model.embed_tokens, ...);
- the q and k projections un-permuted: llama.cpp's converter stores their rows permuted for its
  rotary embedding on adjacent pairs (reshape(heads, 2, head_dim/2, in), swap axes 1 and 2);
  Hugging Face and mlx-lm rotate halves, so the inverse permutation is applied here;
- config.json from the llama.* metadata; tokenizer.json (a `tokenizers` byte-level BPE) from the
  tokenizer.ggml.* vocabulary and merges; tokenizer_config.json with the chat template.

GGUF Q4_1 stores each group of 32 weights as d*q + m (q in 0..15) and Q8_0 as d*q (q in
-128..127): exactly mlx's affine w = scale*q + bias with (scale, bias) = (d, m), and for Q8_0
(d, -128*d) with q + 128. So the quantized model is a lossless repacking and the float32 one
is the exact dequantization.
"""

from dataclasses import dataclass

import numpy as np

# llama.cpp's names -> Hugging Face llama's.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GROUP_SIZE = 32  # what mx.load gives for GGUF's Q4_0, Q4_1 and Q8_0 blocks
CONTROL = 3  # llama.cpp's token type for control tokens
# llama.cpp's "smollm" pre-tokenizer: each digit on its own, then GPT-2's byte-level split.
PRE_TOKENIZERS = ("smollm",)


class GGUFError(ValueError):
    """A GGUF file this importer cannot turn into a Hugging Face llama model."""


@dataclass
class Tensor:
    """One weight: float (`weight` only) or affine-quantized (packed weight, scales, biases)."""

    weight: object
    scales: object = None
    biases: object = None
    bits: int = 0

    @property
    def quantized(self):
        return self.scales is not None


def read(path):
    """(tensors by llama.cpp name, metadata) from a GGUF file."""
    import mlx.core as mx

    arrays, meta = mx.load(str(path), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise GGUFError(f"{path}: architecture {meta.get('general.architecture')!r}, expected 'llama'")
    tensors = {}
    for key, value in arrays.items():
        base, kind = key.rsplit(".", 1)
        t = tensors.setdefault(base, Tensor(None))
        setattr(t, kind, value)
    return tensors, meta


def _scalar(meta, key):
    if key not in meta:
        raise GGUFError(f"GGUF metadata: {key} is missing")
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _float(value):
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def hf_config(meta):
    """config.json for a float Hugging Face llama model, from the GGUF's llama.* metadata."""
    get = lambda k: _scalar(meta, f"llama.{k}")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = hidden // heads
    if int(get("rope.dimension_count")) != head_dim:
        raise GGUFError("GGUF metadata: partial rotary embeddings are not supported")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float(get("rope.freq_base")),
        "rope_scaling": None,
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            config[f"{name}_token_id"] = int(_scalar(meta, f"tokenizer.ggml.{key}"))
    return config


def unpermute(x, n_heads):
    """Undo llama.cpp's q/k row permutation (rows: heads x head_dim; any trailing shape)."""
    rows = x.shape[0]
    y = x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2)
    return y.reshape(x.shape)


def hf_tensors(tensors, config):
    """{Hugging Face name: Tensor}, q/k un-permuted, quantized ones with bits and group checked.
    No output tensor in the file means tied embeddings (config's tie_word_embeddings)."""
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            hf = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
        elif len(parts) == 1 and parts[0] in TOP_NAMES:
            hf = TOP_NAMES[parts[0]]
        else:
            raise GGUFError(f"GGUF tensor {name!r} has no Hugging Face llama name")
        if t.quantized:
            t.bits = _bits(name, t, _in_features(parts[-1], config))
        if parts[-1] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads" if parts[-1] == "attn_q" else "num_key_value_heads"]
            t = Tensor(
                *(unpermute(a, heads) if a is not None else None for a in (t.weight, t.scales, t.biases)),
                t.bits,
            )
        out[hf] = t
    config["tie_word_embeddings"] = "lm_head" not in out
    missing = {
        f"model.layers.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in LAYER_NAMES.values()
    }
    missing |= {"model.embed_tokens", "model.norm"}
    if missing - set(out):
        raise GGUFError(f"GGUF file lacks tensors: {sorted(missing - set(out))[:5]}")
    return out


def _in_features(kind, config):
    if kind == "ffn_down":
        return config["intermediate_size"]
    if kind == "attn_output":
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def _bits(name, t, in_features):
    bits = t.weight.shape[-1] * 32 // in_features
    if bits not in (4, 8) or t.scales.shape[-1] * GROUP_SIZE != in_features:
        raise GGUFError(
            f"GGUF tensor {name}: a quantization mlx does not read as affine with group "
            f"{GROUP_SIZE} (packed {tuple(t.weight.shape)}, scales {tuple(t.scales.shape)})"
        )
    return bits


def float32_weights(tensors):
    """{name.weight: float32 array}: the exact dequantization (float32 scales and biases)."""
    import mlx.core as mx

    out = {}
    for name, t in tensors.items():
        w = t.weight
        if t.quantized:
            scales, biases = t.scales.astype(mx.float32), t.biases.astype(mx.float32)
            w = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=t.bits)
        out[f"{name}.weight"] = w.astype(mx.float32)
    return out


def quantized_weights(tensors):
    """{name.weight/.scales/.biases: array} in mlx's affine format, float32 scales and biases
    (mlx's CPU quantized product is far slower with float16 ones), and the per-layer bits."""
    import mlx.core as mx

    out, bits = {}, {}
    for name, t in tensors.items():
        out[f"{name}.weight"] = t.weight if t.quantized else t.weight.astype(mx.float32)
        if t.quantized:
            out[f"{name}.scales"] = t.scales.astype(mx.float32)
            out[f"{name}.biases"] = t.biases.astype(mx.float32)
            bits[name] = t.bits
    return out, bits


def quantization_config(bits):
    """mlx-lm's `quantization` entry: the most common bit width as the default, the others per
    layer (e.g. an 8-bit embedding beside 4-bit linear layers)."""
    widths = sorted(set(bits.values()), key=lambda b: (-list(bits.values()).count(b), b))
    default = {"group_size": GROUP_SIZE, "bits": widths[0], "mode": "affine"}
    per_layer = {
        name: {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
        for name, b in sorted(bits.items())
        if b != widths[0]
    }
    return {**default, **per_layer}


def special_tokens(meta):
    """The control tokens (llama.cpp's token type 3), in id order."""
    tokens, types = meta["tokenizer.ggml.tokens"], np.array(meta["tokenizer.ggml.token_type"])
    return [(i, tokens[i]) for i in np.flatnonzero(types == CONTROL).tolist()]


def tokenizer_json(meta):
    """tokenizer.json: the GGUF's byte-level BPE (vocabulary, merges, control tokens) with its
    pre-tokenizer: digits one by one, then GPT-2's byte-level split, no prefix space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"GGUF tokenizer {kind!r}/{pre!r}: only byte-level BPE ('gpt2') with {PRE_TOKENIZERS}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):
        raise GGUFError("GGUF merges: each must be two tokens separated by one space")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in special_tokens(meta)])
    return tok.to_str(pretty=True)


def tokenizer_config(meta, model_max_length):
    """tokenizer_config.json: the special tokens named by the GGUF's ids, no BOS added (as
    tokenizer.ggml.add_bos_token says), and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    name = lambda key: tokens[int(_scalar(meta, f"tokenizer.ggml.{key}"))]
    if "tokenizer.ggml.add_bos_token" in meta and _scalar(meta, "tokenizer.ggml.add_bos_token"):
        raise GGUFError("GGUF tokenizer adds a BOS token: not supported by this importer")
    specials = special_tokens(meta)
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in specials
        },
        "bos_token": name("bos_token_id"),
        "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"),
        "unk_token": name("unknown_token_id"),
        "chat_template": meta["tokenizer.chat_template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "GPT2Tokenizer",
    }
    return config
