"""Build models/tiny-mistral: the offline, deterministic test and demo base model.

NOT a real LLM. A ~1M-parameter float32 Mistral-architecture network with a sentencepiece
tokenizer (byte fallback) trained on the bundled sample text, a Mistral-style [INST] chat
template, and a short full-parameter pretraining pass on the sample text, so LoRA adapts a
language model, as it would with a real base (LoRA on random weights barely learns).

    python -m train.tiny_model --out models/tiny-mistral
"""

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson

from train import atomic, paths

# Mistral v0.1-style: rejects a system role, so prompt.py's system folding is exercised.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

TINY_CONFIG = {
    "model_type": "mistral",
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
}
VOCAB_SIZE = 1024
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
    """A sentencepiece BPE model with byte fallback, wrapped as a Hugging Face tokenizer.

    No normaliser and no dummy prefix (the decoder strips nothing), so decode(encode(x)) == x
    for any UTF-8 text, leading and repeated spaces included.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=VOCAB_SIZE,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=["[INST]", "[/INST]"],
            num_threads=1, minloglevel=2,
        )
        # from_pretrained converts the sentencepiece model into a fast tokenizer.json.
        tok = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_prefix_space=False)
        tok.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]"]})
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(str(out_dir))
        # Drop keys that record how *this* process loaded it (they vary with HF_HUB_OFFLINE).
        cfg_path = Path(out_dir) / "tokenizer_config.json"
        tok_cfg = orjson.loads(cfg_path.read_bytes())
        for key in ("local_files_only", "is_local"):
            tok_cfg.pop(key, None)
        cfg_path.write_bytes(orjson.dumps(tok_cfg, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        # The trainer records its (temporary) output path in the model: blank it so the file
        # is byte-identical from build to build.
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        proto = sp_pb2.ModelProto()
        proto.ParseFromString(Path(prefix + ".model").read_bytes())
        proto.trainer_spec.model_prefix = ""
        (Path(out_dir) / "tokenizer.model").write_bytes(proto.SerializeToString())
    return tok


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
            print(f"tiny-model: pretrain step {step}/{steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - tic:.1f}s)", file=sys.stderr, flush=True)


def build(out_dir, steps=150):
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out_dir = Path(out_dir)
    pairs = sample_texts()
    texts = [t for pair in pairs for t in pair] + [f"{q} {a}" for q, a in pairs]

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok = build_tokenizer(texts, tmp)
        config = dict(TINY_CONFIG, vocab_size=len(tok))
        mx.random.seed(SEED)
        np.random.seed(SEED)
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
        mx.eval(model.parameters())

        sequences = [[tok.bos_token_id] + tok.encode(f"{q} {a}", add_special_tokens=False)
                     + [tok.eos_token_id] for q, a in pairs]
        pretrain(model, sequences, steps=steps)

        weights = dict(tree_flatten(model.parameters()))
        n_params = sum(v.size for v in weights.values())
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
        (tmp / "generation_config.json").write_bytes(orjson.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        (tmp / "README.md").write_text(
            "# tiny-mistral\n\nA test and demo model built by `make tiny-model`. NOT a real LLM: "
            f"{n_params:,} parameters, pretrained for {steps} steps on the bundled sample text.\n",
            encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        atomic.replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    digest = hashlib.sha256((out_dir / "model.safetensors").read_bytes()).hexdigest()[:16]
    print(f"tiny-model: wrote {out_dir} ({n_params:,} parameters, vocab {config['vocab_size']}, "
          f"weights sha256 {digest})", file=sys.stderr)
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(paths.TINY_MODEL))
    parser.add_argument("--steps", type=int, default=150, help="pretraining steps")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    build(args.out, steps=args.steps)


if __name__ == "__main__":
    main()
