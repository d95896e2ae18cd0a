"""A GGUF file (llama.cpp, Ollama) from a fused float model, kept only when reading it back
verifies it.

Written with mlx-lm's exporter (mlx_lm.gguf: its weight names, q/k permutation and metadata)
with one change: the vocabulary. mlx-lm gives every token the score -1000 and marks as control
only the tokenizer's "special" tokens; llama.cpp's sentencepiece ("llama") tokenizer merges
pieces by score, so that file would tokenize differently from the model. Here tokens, scores
and types come from the base's sentencepiece model (tokenizer.model), as llama.cpp's own
convert_hf_to_gguf.py takes them, and the chat template is stored too.

Read back with the `gguf` package (llama.cpp's own reader), the file must have: exactly the
tensors a llama-architecture model of this config needs, each with its shape, type (F16, norms
F32) and values (q/k in llama.cpp's rotary order); the architecture numbers of the config; the
vocabulary of tokenizer.model with its scores, the Hugging Face tokenizer's pieces at the same
ids, special tokens typed CONTROL, byte pieces BYTE; BOS/EOS ids and whether they are added, the
dummy-prefix flag; the chat template. What is not verified here: running it in llama.cpp (not
installed).
"""

from pathlib import Path

GGUF_NAME = "ggml-model-f16.gguf"
MODEL_TYPES = ("llama", "mistral")  # dense models; mlx-lm also lists mixtral, not verified here
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf TokenType = sentencepiece's
F32, F16 = 0, 1  # GGMLQuantizationType


class Unsupported(Exception):
    """mlx-lm's exporter cannot write a correct file for this model; the message says why."""


def export(out_dir, base, model, config, tokenizer, chat_template, texts=()):
    """Write out_dir/ggml-model-f16.gguf and verify it (`texts`: tokenized as llama.cpp would and
    as the model's tokenizer does); {"file": name or None, "note": ...}."""
    from mlx.utils import tree_flatten

    path = Path(out_dir) / GGUF_NAME
    try:
        sp_path = sentencepiece_model(base)
        weights = {k: v for k, v in tree_flatten(model.parameters())}
        vocab = vocabulary(sp_path, hf_of(tokenizer), rows=int(weights["model.embed_tokens.weight"].shape[0]))
        write(path, weights, config, vocab, chat_template)
        problems = verify(path, weights, config, hf_of(tokenizer), vocab, chat_template, texts)
    except Unsupported as e:
        path.unlink(missing_ok=True)
        return {"file": None, "note": f"not exported: {e}"}
    except Exception as e:  # the fused model itself is fine
        path.unlink(missing_ok=True)
        return {"file": None, "note": f"not exported: the export failed: {type(e).__name__}: {e}"}
    if problems:
        path.unlink(missing_ok=True)
        return {"file": None, "note": "not exported: reading the file back found " + "; ".join(problems[:5])}
    if sp_path.parent.resolve() != Path(out_dir).resolve():
        (Path(out_dir) / "tokenizer.model").write_bytes(sp_path.read_bytes())
    return {
        "file": GGUF_NAME,
        "note": (
            f"wrote {GGUF_NAME} (F16, llama architecture, {len(vocab['tokens'])}-token "
            "sentencepiece vocabulary, chat template); read back and verified: tensors, "
            f"values, metadata, tokenizer ({len(texts)} texts tokenized as llama.cpp "
            "does give the model's ids); not run in llama.cpp here"
        ),
    }


def hf_of(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def sentencepiece_model(base):
    """The base's tokenizer.model (a local folder, or the Hugging Face cache of a hub id)."""
    folder = Path(base)
    if not folder.exists():
        from mlx_lm.utils import hf_repo_to_path

        try:
            folder = hf_repo_to_path(base)
        except Exception as e:
            raise Unsupported(f"cannot find the files of {base} in the Hugging Face cache ({e})") from e
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise Unsupported(
            f"{base} has no tokenizer.model (sentencepiece): mlx-lm's exporter would give every "
            "token the score -1000, and llama.cpp merges sentencepiece pieces by score, so the file "
            "would tokenize differently from the model"
        )
    return path


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
            "add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
            "add_bos_token": bool(probe) and probe[0] == hf.bos_token_id,
            "add_eos_token": bool(probe) and probe[-1] == hf.eos_token_id,
        },
    }


class _Vocab:
    """What mlx_lm.gguf.prepare_metadata reads from its HfVocab."""

    def __init__(self, vocab):
        from types import SimpleNamespace

        from mlx_lm.gguf import TokenType

        self.vocab_size = len(vocab["tokens"])
        self._rows = [
            (t, s, TokenType(k)) for t, s, k in zip(vocab["tokens"], vocab["scores"], vocab["types"])
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
    for key, value in vocab["flags"].items():
        metadata[f"tokenizer.ggml.{key}"] = mx.array(value)
    if chat_template:
        metadata["tokenizer.chat_template"] = chat_template
    mx.save_gguf(str(path), out, metadata)


# --------------------------------------------------------------------------- reading back


def expected_tensors(config):
    """GGUF name -> mlx name, for a dense llama-architecture model (llama.cpp's names)."""
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not config.get("tie_word_embeddings", False):
        names["output.weight"] = "lm_head.weight"
    parts = {
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
    for i in range(config["num_hidden_layers"]):
        for g, m in parts.items():
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{m}.weight"
    return names


def rotary_order(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def verify(path, weights, config, hf, vocab, chat_template, texts=()):
    """Everything wrong with the file at `path`, as sentences ([] when it is right)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return (
        check_tensors(reader, weights, config)
        + check_metadata(reader, config)
        + check_tokenizer(reader, hf, vocab, chat_template)
        + check_tokenization(reader, hf, texts)
    )


def check_tensors(reader, weights, config):
    import mlx.core as mx
    import numpy as np

    problems, names = [], expected_tensors(config)
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(names):
        missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
        problems.append(f"tensor names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    for gname, mname in names.items():
        t = found.get(gname)
        if t is None or mname not in weights:
            continue
        want = np.array(weights[mname].astype(mx.float32 if weights[mname].ndim == 1 else mx.float16))
        if ".attn_q." in gname:
            want = rotary_order(want, heads)
        elif ".attn_k." in gname:
            want = rotary_order(want, kv)
        if [int(x) for x in t.shape] != list(reversed(want.shape)):
            problems.append(
                f"{gname}: shape {list(t.shape)} (ggml order), expected {list(reversed(want.shape))}"
            )
        elif int(t.tensor_type) != (F32 if want.ndim == 1 else F16):
            problems.append(f"{gname}: type {t.tensor_type.name}")
        elif not np.array_equal(np.asarray(t.data).reshape(want.shape), want):
            problems.append(f"{gname}: values differ from the fused model's")
    return problems


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def check_metadata(reader, config):
    want = {
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"]),
        "llama.rope.dimension_count": config.get("head_dim")
        or config["hidden_size"] // config["num_attention_heads"],
        "llama.context_length": config["max_position_embeddings"],
    }
    problems = [
        f"{k} is {field(reader, k)!r}, expected {v!r}" for k, v in want.items() if field(reader, k) != v
    ]
    for key, value in (
        ("llama.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-5)),
        ("llama.rope.freq_base", config.get("rope_theta", 10000.0)),
    ):
        got = field(reader, key)
        if got is None or abs(got - value) > 1e-6 * max(1.0, abs(value)):
            problems.append(f"{key} is {got!r}, expected {value!r}")
    return problems


def check_tokenizer(reader, hf, vocab, chat_template):
    problems = []
    tokens, scores, types = (field(reader, f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
    if field(reader, "tokenizer.ggml.model") != "llama":
        problems.append(
            f"tokenizer.ggml.model is {field(reader, 'tokenizer.ggml.model')!r}, expected 'llama'"
        )
    if tokens is None or scores is None or types is None:
        return problems + ["tokenizer.ggml.tokens/scores/token_type missing"]
    if list(tokens) != vocab["tokens"] or list(types) != vocab["types"]:
        problems.append("tokens or token types differ from tokenizer.model's")
    if [round(float(s), 4) for s in scores] != [round(s, 4) for s in vocab["scores"]]:
        problems.append("token scores differ from tokenizer.model's")
    real = [float(s) for s, k in zip(scores, types) if k == NORMAL]
    if len(set(real)) < 2:
        problems.append(
            f"every normal token has the same score ({real[:1]}): llama.cpp could not merge by score"
        )
    hf_tokens = hf.convert_ids_to_tokens(list(range(len(hf))))
    if list(tokens[: len(hf_tokens)]) != hf_tokens:
        bad = next(i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b)
        problems.append(
            f"token {bad} is {tokens[bad]!r} in the file, {hf_tokens[bad]!r} in the model's tokenizer"
        )
    specials = set(hf.all_special_ids) | {
        i for i, t in getattr(hf, "added_tokens_decoder", {}).items() if t.special
    }
    wrong = sorted(i for i in specials - {hf.unk_token_id} if types[i] != CONTROL)
    if wrong:
        problems.append(f"special tokens not typed CONTROL: {[tokens[i] for i in wrong[:5]]}")
    if hf.unk_token_id is not None and types[hf.unk_token_id] not in (UNKNOWN, CONTROL):
        problems.append(f"the unknown token {tokens[hf.unk_token_id]!r} is typed {types[hf.unk_token_id]}")
    byte_pieces = [i for i, t in enumerate(tokens) if len(t) == 6 and t.startswith("<0x") and t.endswith(">")]
    if vocab["byte_fallback"] and (len(byte_pieces) != 256 or any(types[i] != BYTE for i in byte_pieces)):
        problems.append(f"byte fallback, but {len(byte_pieces)} byte pieces, not all typed BYTE")
    for key, value in (("bos_token_id", hf.bos_token_id), ("eos_token_id", hf.eos_token_id)):
        if value is not None and field(reader, f"tokenizer.ggml.{key}") != value:
            problems.append(
                f"tokenizer.ggml.{key} is {field(reader, f'tokenizer.ggml.{key}')!r}, expected {value}"
            )
    for key, value in vocab["flags"].items():
        if field(reader, f"tokenizer.ggml.{key}") is not value:
            problems.append(
                f"tokenizer.ggml.{key} is {field(reader, f'tokenizer.ggml.{key}')!r}, expected {value}"
            )
    if chat_template and field(reader, "tokenizer.chat_template") != chat_template:
        problems.append("tokenizer.chat_template differs from the run's chat template")
    return problems


def check_tokenization(reader, hf, texts):
    """Each text (stripped: a leading space is where the Hugging Face tokenizer and sentencepiece
    disagree) tokenized from the file's vocabulary as llama.cpp does must give the ids the
    model's tokenizer gives (BOS and the dummy prefix included; llama.cpp's defaults when the
    file does not say). The chat markup around a message (control tokens) is not covered."""
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    if tokens is None or scores is None:
        return []
    ids = {t: i for i, t in enumerate(tokens)}
    flag = lambda key: field(reader, f"tokenizer.ggml.{key}") is not False  # noqa: E731
    bos = field(reader, "tokenizer.ggml.bos_token_id") if flag("add_bos_token") else None
    prefix = " " if flag("add_space_prefix") else ""
    texts = [t.strip() for t in texts if t.strip()]
    differ = [
        t
        for t in texts
        if ([bos] if bos is not None else []) + spm_tokenize(prefix + t, ids, scores) != hf.encode(t)
    ]
    if differ:
        return [
            f"{len(differ)} of {len(texts)} texts tokenize differently under llama.cpp's algorithm "
            f"(first: {differ[0][:60]!r})"
        ]
    return []


def spm_tokenize(text, ids, scores):
    """llama.cpp's sentencepiece tokenizer (llm_tokenizer_spm_session, src/llama-vocab.cpp) in
    Python: spaces to U+2581, one symbol per character, then repeatedly merge the adjacent pair
    whose joined text is the token with the highest score (ties: the leftmost pair); symbols
    that are not tokens become their UTF-8 bytes' <0xXX> tokens."""
    import heapq

    syms = list(text.replace(" ", "\u2581"))
    if not syms:
        return []
    nxt, prev = list(range(1, len(syms))) + [-1], list(range(-1, len(syms) - 1))
    heap = []

    def add(left, right):
        if left >= 0 and right >= 0 and (i := ids.get(syms[left] + syms[right])) is not None:
            heapq.heappush(heap, (-scores[i], left, right, len(syms[left]) + len(syms[right])))

    for i in range(1, len(syms)):
        add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left], syms[right] = syms[left] + syms[right], ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        add(prev[left], left)
        add(left, nxt[left])
    out, i = [], 0
    while i != -1:
        out += [ids[syms[i]]] if syms[i] in ids else [ids[f"<0x{b:02X}>"] for b in syms[i].encode()]
        i = nxt[i]
    return out
