"""Reading back a GGUF that train/fuse_gguf.py wrote, with the `gguf` package (llama.cpp's own
reader): every way it differs from the fused model, as sentences. Tensors (llama.cpp's names,
shapes, types, values, q/k in llama.cpp's rotary order), the architecture numbers, the vocabulary
against the model's tokenizer, texts tokenized with llama.cpp's sentencepiece algorithm
(spm_tokenize, in Python: fuse runs without llama.cpp installed), the template rendered by Jinja
against core/prompt.py."""

from train.gguf_import import LAYER_NAMES, TOP_NAMES

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf TokenType = sentencepiece's
F32, F16 = 0, 1  # GGMLQuantizationType


class Unsupported(Exception):
    """The exporter cannot write a correct file for this model; the message says why."""


def hf_of(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def expected_tensors(config):
    """GGUF name -> mlx name, for a dense llama-architecture model (llama.cpp's names, the map
    make base-model reads GGUFs with)."""
    names = {f"{g}.weight": f"{m}.weight" for g, m in TOP_NAMES.items()}
    if config.get("tie_word_embeddings", False):
        del names["output.weight"]
    for i in range(config["num_hidden_layers"]):
        for g, m in LAYER_NAMES.items():
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
    """The vocabulary (sentencepiece or byte-level BPE), the special tokens, the flags, the template."""
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return ["tokenizer.ggml.tokens/token_type missing"]
    problems = (
        check_bpe(reader, vocab) if vocab.get("model") == "gpt2" else check_spm(reader, vocab, tokens, types)
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


def check_bpe(reader, vocab):
    problems = []
    for key, want in (("model", "gpt2"), ("pre", vocab["pre"])):
        if field(reader, f"tokenizer.ggml.{key}") != want:
            problems.append(
                f"tokenizer.ggml.{key} is {field(reader, f'tokenizer.ggml.{key}')!r}, expected {want!r}"
            )
    if list(field(reader, "tokenizer.ggml.tokens")) != vocab["tokens"]:
        problems.append("tokens differ from the tokenizer's")
    if list(field(reader, "tokenizer.ggml.token_type")) != vocab["types"]:
        problems.append("token types differ from the tokenizer's")
    if list(field(reader, "tokenizer.ggml.merges") or []) != vocab["merges"]:
        problems.append("the merges differ from the tokenizer's")
    return problems


def check_spm(reader, vocab, tokens, types):
    problems = []
    scores = field(reader, "tokenizer.ggml.scores")
    if field(reader, "tokenizer.ggml.model") != "llama":
        problems.append(
            f"tokenizer.ggml.model is {field(reader, 'tokenizer.ggml.model')!r}, expected 'llama'"
        )
    if scores is None:
        return problems + ["tokenizer.ggml.scores missing"]
    if list(tokens) != vocab["tokens"] or list(types) != vocab["types"]:
        problems.append("tokens or token types differ from tokenizer.model's")
    if [round(float(s), 4) for s in scores] != [round(s, 4) for s in vocab["scores"]]:
        problems.append("token scores differ from tokenizer.model's")
    real = [float(s) for s, k in zip(scores, types) if k == NORMAL]
    if len(set(real)) < 2:
        problems.append(
            f"every normal token has the same score ({real[:1]}): llama.cpp could not merge by score"
        )
    unk = vocab.get("unk")
    if unk is not None and types[unk] not in (UNKNOWN, CONTROL):
        problems.append(f"the unknown token {tokens[unk]!r} is typed {types[unk]}")
    byte_pieces = [i for i, t in enumerate(tokens) if len(t) == 6 and t.startswith("<0x") and t.endswith(">")]
    if vocab["byte_fallback"] and (len(byte_pieces) != 256 or any(types[i] != BYTE for i in byte_pieces)):
        problems.append(f"byte fallback, but {len(byte_pieces)} byte pieces, not all typed BYTE")
    return problems


def check_template(template, tokenizer, texts):
    """The stored template, rendered by plain Jinja (as llama.cpp's bindings and LM Studio do; the
    settings of Hugging Face's renderer), writes what core/prompt.py writes, system prompt
    included, for conversations made of the validation texts."""
    if template is None:
        return []
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from core.prompt import render

    hf = hf_of(tokenizer)
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    a, b, c = (list(texts) + ["a", "b", "c"])[:3]
    for messages in (
        [{"role": "user", "content": a}],
        [{"role": "system", "content": c}, {"role": "user", "content": a}],
        [{"role": "system", "content": c}, {"role": "user", "content": a}]
        + [{"role": "assistant", "content": b}, {"role": "user", "content": b}],
    ):
        got = jinja.render(
            messages=messages, add_generation_prompt=True, bos_token=hf.bos_token, eos_token=hf.eos_token
        )
        if got != render(tokenizer, messages, add_generation_prompt=True):
            return [f"the stored chat template renders {len(messages)} messages differently from training"]
    return []


def check_tokenization(reader, hf, texts):
    """Each text (stripped), tokenized from the file's vocabulary as llama.cpp does, must give the
    ids the model's tokenizer gives: after a control token, as a chat template writes it
    ("[INST] text"), and, where the file sets the dummy prefix, at the start of a prompt (BOS
    added); llama.cpp's defaults when the file does not say."""
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    if tokens is None or scores is None or field(reader, "tokenizer.ggml.model") != "llama":
        return []  # a BPE vocabulary: check_in_llamacpp
    ids = {t: i for i, t in enumerate(tokens)}
    flag = lambda key: field(reader, f"tokenizer.ggml.{key}") is not False  # noqa: E731
    bos = field(reader, "tokenizer.ggml.bos_token_id") if flag("add_bos_token") else None
    prefix = " " if flag("add_space_prefix") else ""
    texts = [t.strip() for t in texts if t.strip()]
    differ = [
        t
        for t in texts
        if spm_tokenize(prefix + " " + t, ids, scores)
        != hf.encode(f"{hf.eos_token} {t}", add_special_tokens=False)[1:]
        or (
            prefix
            and ([bos] if bos is not None else []) + spm_tokenize(prefix + t, ids, scores) != hf.encode(t)
        )
    ]
    if differ:
        return [
            f"{len(differ)} of {len(texts)} texts tokenize differently under llama.cpp's algorithm "
            f"(first: {differ[0][:60]!r})"
        ]
    return []


def check_in_llamacpp(path, hf, texts):
    """Where llama.cpp is installed (make llamacpp): the file's vocabulary, loaded by llama.cpp
    itself, tokenizes each text after a control token (as a chat template writes it) into the
    model's ids. None where it is not installed."""
    from core import llamacpp

    if not llamacpp.installed():
        return None
    model = llamacpp.load(path, vocab_only=True)
    differ = [
        t
        for t in (t.strip() for t in texts)
        if t
        and model.tokenize(f"{hf.eos_token} {t}".encode(), add_bos=False, special=True)
        != hf.encode(f"{hf.eos_token} {t}", add_special_tokens=False)
    ]
    if differ:
        return [f"{len(differ)} texts tokenize differently in llama.cpp (first: {differ[0][:60]!r})"]
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
