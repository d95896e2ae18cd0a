"""Build models/tiny-mistral and models/tiny-mistral-4bit: the offline test and demo base models.

NOT a real LLM. A ~1.5M-parameter float32 network shaped like the users' model,
Mistral-7B-Instruct-v0.3 (mlx-community/Mistral-7B-Instruct-v0.3-4bit), in everything but size:

- the tokenizer: a Llama-style sentencepiece BPE with a dummy prefix, byte fallback and digit
  splitting, its control tokens at v0.3's ids and in v0.3's order (<unk> <s> </s> [INST] [/INST]
  [TOOL_CALLS] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_RESULTS] [/TOOL_RESULTS]
  [control_8] ... [control_768] = ids 0..770, then the 256 byte pieces), loaded through
  transformers' LlamaTokenizer as the real one is;
- the chat template published with v0.3 (tests/fixtures/chat_templates/mistral-v0.3.jinja,
  verbatim: it moves the system prompt in front of the *last* user message);
- a 4-bit sibling in which every linear layer (and the embedding) is quantized, as in the
  mlx-community model (group size 64, 4 bits), with float32 scales: mlx's CPU quantized matmul
  is ~40x slower with float16 scales, which would make QLoRA tests take minutes a step.

It is pretrained for a short full-parameter pass on the bundled sample text, so LoRA adapts a
language model, as it would with a real base (LoRA on random weights barely learns).

    python -m train.tiny_model --out models/tiny-mistral --out-4bit models/tiny-mistral-4bit
"""

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

from core import atomic, paths

TEMPLATES = paths.ROOT / "tests" / "fixtures" / "chat_templates"
CHAT_TEMPLATE = (TEMPLATES / "mistral-v0.3.jinja").read_text(encoding="utf-8")

# Mistral-7B-Instruct-v0.3's control tokens after <unk> <s> </s>, in its order (ids 3..770).
CONTROL_TOKENS = [
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
] + [f"[control_{i}]" for i in range(8, 769)]
# 4-bit like the mlx-community model: group 64 divides every input width below (128, 384).
QUANT_GROUP_SIZE = 64
QUANT_BITS = 4

TINY_CONFIG = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 384,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VOCAB_SIZE = 2048
SEED = 0


def sample_texts(folder=paths.SAMPLE):
    """(question, answer) pairs from the sample data's chat conversations."""
    pairs = []
    for f in sorted(Path(folder).glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            msgs = orjson.loads(line)["messages"]
            users = [m["content"] for m in msgs if m["role"] == "user"]
            answers = [m["content"] for m in msgs if m["role"] == "assistant"]
            pairs.append((" ".join(users), " ".join(answers)))
    if not pairs:
        sys.exit(f"tiny-model: no sample conversations found in {folder}")
    return pairs


def build_tokenizer(texts, out_dir):
    """A sentencepiece BPE model configured as Mistral v0.3's, wrapped as a Hugging Face tokenizer.

    Dummy prefix (a leading "▁" on the first piece), identity normalisation (spaces kept as they
    are), byte fallback, split digits, the control tokens at v0.3's ids, all of them special.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=VOCAB_SIZE,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            control_symbols=CONTROL_TOKENS,
            num_threads=1,
            minloglevel=2,
        )
        # The trainer records its (temporary) output path in the model: blank it so the file
        # is byte-identical from build to build.
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
        proto.trainer_spec.model_prefix = ""
        Path(prefix + ".model").write_bytes(proto.SerializeToString())
        # from_pretrained converts the sentencepiece model (vocab, merges) for LlamaTokenizer.
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True, add_eos_token=False)
        tok.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS], special_tokens=True
        )
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir))
        shutil.copyfile(prefix + ".model", Path(out_dir) / "tokenizer.model")
    _clean_tokenizer_config(Path(out_dir) / "tokenizer_config.json")
    check_tokenizer_shape(tok)
    return tok


def _clean_tokenizer_config(path):
    """Drop keys that record how *this* process loaded it (they vary with HF_HUB_OFFLINE)."""
    cfg = orjson.loads(path.read_bytes())
    for key in ("local_files_only", "is_local"):
        cfg.pop(key, None)
    path.write_bytes(orjson.dumps(cfg, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))


def check_tokenizer_shape(tok):
    """Fail the build unless the tokenizer has v0.3's special-token layout and dummy prefix."""
    expected = ["<unk>", "<s>", "</s>"] + CONTROL_TOKENS
    got = tok.convert_ids_to_tokens(list(range(len(expected))))
    if got != expected:
        bad = next(i for i, (g, e) in enumerate(zip(got, expected)) if g != e)
        raise SystemExit(f"tiny-model: token id {bad} is {got[bad]!r}, Mistral v0.3 has {expected[bad]!r}")
    if tok.convert_ids_to_tokens(len(expected)) != "<0x00>":
        raise SystemExit("tiny-model: the byte pieces do not follow the control tokens")
    special = set(tok.all_special_tokens) | {
        t.content for t in tok.added_tokens_decoder.values() if t.special
    }
    missing = [t for t in expected if t not in special]
    if missing:
        raise SystemExit(f"tiny-model: not special: {missing[:5]}")
    first = tok.convert_ids_to_tokens(tok.encode("Faro", add_special_tokens=False))[0]
    if not first.startswith("\u2581"):
        raise SystemExit(f"tiny-model: no dummy prefix (first piece {first!r})")


def pretrain(model, sequences, steps=150, batch_size=16, lr=3e-3, log_every=50):
    """A short full-parameter language-model pass on plain sample text."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np

    rng = np.random.default_rng(SEED)
    max_len = max(len(s) for s in sequences)
    opt = optim.AdamW(learning_rate=optim.cosine_decay(lr, steps, lr * 0.1), weight_decay=0.0)

    def loss_fn(model, batch, mask):
        logits = model(batch[:, :-1])
        ce = nn.losses.cross_entropy(logits, batch[:, 1:]) * mask[:, 1:]
        return ce.sum() / mask[:, 1:].sum()

    step_fn = nn.value_and_grad(model, loss_fn)
    tic = time.perf_counter()
    for step in range(1, steps + 1):
        idx = rng.choice(len(sequences), size=batch_size, replace=False)
        arr = np.zeros((batch_size, max_len), np.int32)
        mask = np.zeros((batch_size, max_len), np.float32)
        for row, i in enumerate(idx):
            arr[row, : len(sequences[i])] = sequences[i]
            mask[row, : len(sequences[i])] = 1
        loss, grads = step_fn(model, mx.array(arr), mx.array(mask))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % log_every == 0 or step == 1:
            print(
                f"tiny-model: pretrain step {step}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - tic:.1f}s)",
                file=sys.stderr,
                flush=True,
            )


def build(out_dir, out_4bit=None, steps=150):
    """Build the float32 model in out_dir and, when out_4bit is given, its 4-bit sibling."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import _get_classes

    out_dir = Path(out_dir)
    pairs = sample_texts()
    texts = [t for pair in pairs for t in pair] + [f"{q} {a}" for q, a in pairs]

    with atomic.staged_dir(out_dir) as tmp:
        tok = build_tokenizer(texts, tmp)
        config = dict(TINY_CONFIG, vocab_size=len(tok))
        mx.random.seed(SEED)
        np.random.seed(SEED)
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
        mx.eval(model.parameters())

        sequences = [
            [tok.bos_token_id] + tok.encode(f"{q} {a}", add_special_tokens=False) + [tok.eos_token_id]
            for q, a in pairs
        ]
        pretrain(model, sequences, steps=steps)
        n_params = write_model(
            tmp, out_dir.name, model, config, f"pretrained for {steps} steps on the bundled sample text"
        )
    report(out_dir, f"{n_params:,} parameters, vocab {config['vocab_size']}")
    if out_4bit:
        build_4bit(model, config, out_dir, Path(out_4bit))
    return out_dir


def build_4bit(model, config, float_dir, out_dir):
    """Quantize the pretrained model as mlx-community's 4-bit Mistral is: every linear layer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    model, qconfig = quantize_model(model, config, QUANT_GROUP_SIZE, QUANT_BITS)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        raise SystemExit(f"tiny-model: layers left unquantized: {linears}")
    scales = {v.dtype for k, v in tree_flatten(model.parameters()) if k.endswith(".scales")}
    if scales != {mx.float32}:
        raise SystemExit(f"tiny-model: 4-bit scales are {scales}, expected float32")
    with atomic.staged_dir(out_dir) as tmp:
        for name in (
            "tokenizer.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "chat_template.jinja",
            "special_tokens_map.json",
        ):
            if (float_dir / name).exists():
                shutil.copyfile(float_dir / name, tmp / name)
        write_model(
            tmp,
            out_dir.name,
            model,
            qconfig,
            f"the 4-bit ({QUANT_BITS} bits, group {QUANT_GROUP_SIZE}, "
            f"float32 scales) copy of {float_dir.name}",
        )
    report(out_dir, f"every linear layer {QUANT_BITS}-bit, group {QUANT_GROUP_SIZE}")


def write_model(folder, name, model, config, what):
    """Weights, config, generation config and a README; returns the parameter count."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    n_params = sum(v.size for v in weights.values())
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    (folder / "config.json").write_bytes(
        orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    )
    (folder / "generation_config.json").write_bytes(orjson.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (folder / "README.md").write_text(
        f"# {name}\n\nA test and demo model built by `make tiny-model`, "
        f"shaped like Mistral-7B-Instruct-v0.3 but NOT a real LLM: {what}.\n",
        encoding="utf-8",
    )
    return n_params


def report(out_dir, what):
    digest = hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    print(f"tiny-model: wrote {out_dir} ({what}, weights sha256 {digest})", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(paths.TINY_MODEL))
    parser.add_argument("--out-4bit", help="where the 4-bit sibling goes (default: OUT-4bit; '' to skip it)")
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out_4bit = args.out.rstrip("/") + "-4bit" if args.out_4bit is None else args.out_4bit
    build(args.out, out_4bit or None, steps=args.steps)


if __name__ == "__main__":
    main()
