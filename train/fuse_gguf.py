"""A GGUF file (llama.cpp, Ollama) from a fused float model, kept only when reading it back
verifies it.

Written with mlx-lm's exporter (mlx_lm.gguf: its weight names, q/k permutation and metadata)
with one change: the vocabulary. mlx-lm gives every token the score -1000 and marks as control
only the tokenizer's "special" tokens; llama.cpp's sentencepiece ("llama") tokenizer merges
pieces by score, so that file would tokenize differently from the model. Here tokens, scores
and types come from the base's sentencepiece model (tokenizer.model), as llama.cpp's own
convert_hf_to_gguf.py takes them, and the chat template is stored too.

Read back with the `gguf` package (llama.cpp's own reader; train/gguf_check.py), the file must have: exactly the
tensors a llama-architecture model of this config needs, each with its shape, type (F16, norms
F32) and values (q/k in llama.cpp's rotary order); the architecture numbers of the config; the
vocabulary of tokenizer.model with its scores, the Hugging Face tokenizer's pieces at the same
ids, special tokens typed CONTROL, byte pieces BYTE; BOS/EOS ids and whether they are added, the
dummy-prefix flag; the chat template (core/prompt.py's system-prompt rule built in:
core.prompt.standalone_template), rendered by Jinja as training renders. Running it in llama.cpp
is tests/test_llamacpp_gguf.py's (llama-cpp-python is optional: make llamacpp).
"""

from pathlib import Path

# the reading back; verify and spm_tokenize are also used from here by the tests
from train import gguf_bpe
from train.gguf_check import (  # noqa: F401
    CONTROL,
    UNUSED,
    USER_DEFINED,
    Unsupported,
    check_in_llamacpp,
    check_template,
    hf_of,
    spm_tokenize,
    verify,
)

GGUF_NAME = "ggml-model-f16.gguf"
MODEL_TYPES = ("llama", "mistral")  # dense models; mlx-lm also lists mixtral, not verified here


def export(out_dir, base, model, config, tokenizer, chat_template, texts=()):
    """Write out_dir/ggml-model-f16.gguf and verify it (`texts`: tokenized as llama.cpp would and
    as the model's tokenizer does); {"file": name or None, "note": ...}."""
    from mlx.utils import tree_flatten

    from core.prompt import standalone_template

    path = Path(out_dir) / GGUF_NAME
    hf = hf_of(tokenizer)
    try:
        weights = {k: v for k, v in tree_flatten(model.parameters())}
        rows = int(weights["model.embed_tokens.weight"].shape[0])
        sp_path = model_folder(base) / "tokenizer.model"
        vocab = vocabulary(sp_path, hf, rows) if sp_path.is_file() else bpe_vocabulary(base, hf, rows)
        template = standalone_template(tokenizer) if chat_template else None
        write(path, weights, config, vocab, template)
        problems = verify(path, weights, config, hf, vocab, template, texts)
        problems += check_template(template, tokenizer, texts)
        in_llamacpp = None if problems else check_in_llamacpp(path, hf, texts)
        problems += in_llamacpp or []
    except Unsupported as e:
        path.unlink(missing_ok=True)
        return {"file": None, "note": f"not exported: {e}"}
    except Exception as e:  # the fused model itself is fine
        path.unlink(missing_ok=True)
        return {"file": None, "note": f"not exported: the export failed: {type(e).__name__}: {e}"}
    if problems:
        path.unlink(missing_ok=True)
        return {"file": None, "note": "not exported: reading the file back found " + "; ".join(problems[:5])}
    if sp_path.is_file() and sp_path.parent.resolve() != Path(out_dir).resolve():
        (Path(out_dir) / "tokenizer.model").write_bytes(sp_path.read_bytes())
    return {"file": GGUF_NAME, "note": note(vocab, len(texts), in_llamacpp is not None)}


def note(vocab, n_texts, in_llamacpp):
    bpe = vocab.get("model") == "gpt2"
    kind = f"byte-level BPE vocabulary (pre-tokenizer {vocab['pre']})" if bpe else "sentencepiece vocabulary"
    how = "by llama.cpp itself" if in_llamacpp else "with llama.cpp's sentencepiece algorithm"
    ids = f"{n_texts} texts tokenized {how} give the model's ids"
    if bpe and not in_llamacpp:
        ids = "the tokenization itself not checked: llama.cpp is not installed (make llamacpp)"
    return (
        f"wrote {GGUF_NAME} (F16, llama architecture, {len(vocab['tokens'])}-token {kind}, chat template "
        f"rendering as training does); read back and verified: tensors, values, metadata, tokenizer "
        f"({ids}), template"
    )


def model_folder(base):
    """The base's files: a local folder, or the Hugging Face cache of a hub id."""
    folder = Path(base)
    if folder.exists():
        return folder
    from mlx_lm.utils import hf_repo_to_path

    try:
        return Path(hf_repo_to_path(base))
    except Exception as e:
        raise Unsupported(f"cannot find the files of {base} in the Hugging Face cache ({e})") from e


def bpe_vocabulary(base, hf, rows):
    try:
        return gguf_bpe.vocabulary(hf, rows)
    except Unsupported as e:
        raise Unsupported(
            f"{base} has no tokenizer.model (sentencepiece), and {e}: mlx-lm's exporter would give "
            "every token the score -1000, and llama.cpp merges sentencepiece pieces by score, so the "
            "file would tokenize differently from the model"
        ) from None


def vocabulary(sp_path, hf, rows):
    """tokens, scores, types as llama.cpp's convert_hf_to_gguf.py makes them for a sentencepiece
    model: the pieces of tokenizer.model; the tokenizer's added tokens on top (special ->
    CONTROL, else USER_DEFINED); [PADn] UNUSED up to the embedding's rows."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE: what llama.cpp's "llama" reads
        raise Unsupported(
            f"{sp_path} is a sentencepiece model of type {proto.trainer_spec.model_type}, not unigram or BPE"
        )
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for token_id, added in sorted(getattr(hf, "added_tokens_decoder", {}).items()):
        while len(tokens) <= token_id:
            tokens.append(f"[PAD{len(tokens)}]"), scores.append(-1000.0), types.append(UNUSED)
        tokens[token_id] = added.content
        types[token_id] = CONTROL if added.special else USER_DEFINED
        if token_id >= len(proto.pieces):
            scores[token_id] = -1000.0
    if len(tokens) > rows:
        raise Unsupported(f"the tokenizer has {len(tokens)} tokens, the embedding only {rows} rows")
    while len(tokens) < rows:
        tokens.append(f"[PAD{len(tokens)}]"), scores.append(-1000.0), types.append(UNUSED)
    probe = hf.encode("a")  # what the model's tokenizer adds, as used
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": hf.bos_token_id,
        "eos": hf.eos_token_id,
        "unk": hf.unk_token_id,
        "sentencepiece_size": len(proto.pieces),
        "byte_fallback": bool(proto.trainer_spec.byte_fallback),
        "flags": {
            "add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix) and prefix_after_special(hf),
            "add_bos_token": bool(probe) and probe[0] == hf.bos_token_id,
            "add_eos_token": bool(probe) and probe[-1] == hf.eos_token_id,
        },
    }


def prefix_after_special(hf):
    """Whether the model's tokenizer gives text that follows a control token the dummy prefix
    ("</s>a" -> "</s>", "▁a": legacy sentencepiece). llama.cpp adds it after every control token
    when add_space_prefix is set, and only there and at the start; Mistral v0.3's tokenizer adds it
    at the start only ("first"). A chat prompt's text always follows a control token, so the
    flag follows this: otherwise llama.cpp would tokenize "[INST] Quem" as "[INST]", "▁",
    "▁Quem" where training had "[INST]", "▁Quem"."""
    ids = hf.encode(f"{hf.eos_token}a", add_special_tokens=False)
    return len(ids) > 1 and hf.convert_ids_to_tokens(ids[1:2])[0].startswith("▁")


class _Vocab:
    """What mlx_lm.gguf.prepare_metadata reads from its HfVocab."""

    def __init__(self, vocab):
        from types import SimpleNamespace

        from mlx_lm.gguf import TokenType

        self.vocab_size = len(vocab["tokens"])
        self._rows = [
            (t, s, TokenType(k))
            for t, s, k in zip(vocab["tokens"], vocab["scores"] or [0.0] * self.vocab_size, vocab["types"])
        ]
        self.tokenizer = SimpleNamespace(
            bos_token_id=vocab["bos"], eos_token_id=vocab["eos"], unk_token_id=vocab["unk"]
        )

    def all_tokens(self):
        return iter(self._rows)


def check_config(config):
    if config.get("model_type") not in MODEL_TYPES:
        raise Unsupported(
            f"the model type is {config.get('model_type')!r}; this exporter writes (and checks) "
            f"only {', '.join(MODEL_TYPES)}"
        )
    if config.get("quantization"):
        raise Unsupported("the weights are quantized; mlx-lm writes GGUF only from float weights")
    head_dim = config.get("head_dim")
    if head_dim and head_dim != config["hidden_size"] // config["num_attention_heads"]:
        raise Unsupported(
            f"head_dim {head_dim} differs from hidden_size / heads, which mlx-lm's metadata "
            "assumes (no attention.key_length)"
        )
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("linear", "default"):
        raise Unsupported(f"rope_scaling {scaling} is not written by mlx-lm's exporter")


def write(path, weights, config, vocab, chat_template):
    import mlx.core as mx
    from mlx_lm.gguf import permute_weights, prepare_metadata, translate_weight_names

    check_config(config)
    heads, kv_heads = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    out = {}
    for name, w in weights.items():
        if "self_attn.q_proj.weight" in name:
            w = permute_weights(w, heads, heads)
        elif "self_attn.k_proj.weight" in name:
            w = permute_weights(w, heads, kv_heads)
        out[translate_weight_names(name)] = w.astype(mx.float32 if w.ndim == 1 else mx.float16)
    metadata = prepare_metadata(config, _Vocab(vocab))
    if vocab.get("model") == "gpt2":  # byte-level BPE: merges and the pre-tokenizer, no scores
        metadata.pop("tokenizer.ggml.scores", None)
        metadata["tokenizer.ggml.model"] = "gpt2"
        metadata["tokenizer.ggml.pre"] = vocab["pre"]
        metadata["tokenizer.ggml.merges"] = vocab["merges"]
    # llama.cpp reads token types as int32 only (mlx-lm writes uint32: "invalid gguf type")
    metadata["tokenizer.ggml.token_type"] = mx.array(vocab["types"], dtype=mx.int32)
    for key, value in vocab["flags"].items():
        metadata[f"tokenizer.ggml.{key}"] = mx.array(value)
    if chat_template:
        metadata["tokenizer.chat_template"] = chat_template
    mx.save_gguf(str(path), out, metadata)


def main(argv=None):
    """python -m train.fuse_gguf --model FOLDER --out DIR: a float model folder (not a run: `make
    fuse` exports those) as DIR/ggml-model-f16.gguf, verified as make fuse verifies it."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m train.fuse_gguf", description=main.__doc__.split(":")[0])
    p.add_argument(
        "--model", required=True, help="a float model folder (config.json, safetensors, tokenizer)"
    )
    p.add_argument("--out", required=True, help="the folder the GGUF is written to")
    args = p.parse_args(argv)
    from mlx_lm import load

    model, tokenizer, config = load(args.model, return_config=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    template = getattr(tokenizer, "_tokenizer", tokenizer).chat_template
    result = export(args.out, args.model, model, config, tokenizer, template)
    print(f"fuse_gguf: {result['note']}", file=sys.stderr)
    return 0 if result["file"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
