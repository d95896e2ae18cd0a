"""The vocabulary of a byte-level BPE model (GPT-2 style: SmolLM2, Llama 3, Qwen) for a GGUF, as
llama.cpp's "gpt2" tokenizer reads it: the tokenizer's tokens by id (byte-level strings), their
types (special added tokens CONTROL, other added tokens USER_DEFINED), the merges in rank order,
and the pre-tokenizer named as llama.cpp names it (tokenizer.ggml.pre, which picks llama.cpp's
splitting regex). llama.cpp's converter recognises a pre-tokenizer by hashing a test string's
tokens against a table of known models; here it is recognised by its structure in
tokenizer.json, for the structures whose llama.cpp regex is known to be the same: anything else is
refused with its description."""

import json

from train.gguf_check import CONTROL, NORMAL, UNUSED, USER_DEFINED, Unsupported


def pre_name(pre):
    """llama.cpp's name for a Hugging Face pre_tokenizer (dict from tokenizer.json)."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [(p or {}).get("type") for p in parts]
    byte_level = parts and parts[-1] and kinds[-1] == "ByteLevel" and parts[-1].get("use_regex", True)
    if byte_level and not parts[-1].get("add_prefix_space", False):
        if kinds == ["ByteLevel"]:
            return "gpt-2"  # the GPT-2 regex alone
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # each digit apart (\p{N}), then the GPT-2 regex
    raise Unsupported(
        f"its pre-tokenizer {json.dumps(pre)[:160]} is not one this exporter maps to llama.cpp's"
    )


def vocabulary(hf, rows):
    """tokens, types, merges, pre and flags of a byte-level BPE tokenizer (Unsupported otherwise)."""
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise Unsupported("its tokenizer has no tokenizer.json (a fast tokenizer)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise Unsupported(f"its tokenizer is a {model.get('type')} model, not a byte-level BPE")
    pre = pre_name(spec.get("pre_tokenizer"))
    if spec.get("normalizer"):
        raise Unsupported(
            f"its tokenizer has a normalizer ({spec['normalizer'].get('type')}), which llama.cpp's gpt2 lacks"
        )
    n = len(hf)
    if n > rows:
        raise Unsupported(f"the tokenizer has {n} tokens, the embedding only {rows} rows")
    tokens = hf.convert_ids_to_tokens(list(range(n)))
    types = [NORMAL] * n
    for token_id, added in getattr(hf, "added_tokens_decoder", {}).items():
        types[token_id] = CONTROL if added.special else USER_DEFINED
    tokens += [f"[PAD{i}]" for i in range(n, rows)]
    types += [UNUSED] * (rows - n)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = hf.encode("a")
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "scores": None,
        "types": types,
        "merges": merges,
        "bos": hf.bos_token_id,
        "eos": hf.eos_token_id,
        "unk": hf.unk_token_id,
        "flags": {
            "add_space_prefix": False,
            "add_bos_token": bool(probe) and probe[0] == hf.bos_token_id,
            "add_eos_token": bool(probe) and probe[-1] == hf.eos_token_id,
        },
    }
