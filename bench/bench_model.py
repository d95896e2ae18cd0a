"""Build models/bench-mistral: a Mistral-shaped float32 model of about 100M parameters with
random weights and the tiny model's tokenizer, for measuring speed on this machine.

Its outputs are noise; decoding never stops early because the end-of-sequence row of
lm_head is zeroed (its logit is always 0, below the maximum of ~1000 random logits).

    python -m bench.bench_model --out models/bench-mistral [--quantize]
"""

import argparse
import shutil
import sys
from pathlib import Path

import orjson

from core import atomic, paths
from train.tiny_model import TINY_CONFIG

BENCH_CONFIG = dict(
    TINY_CONFIG,
    hidden_size=768,
    num_hidden_layers=16,
    intermediate_size=2048,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=4096,
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def build(out_dir, tokenizer_dir=paths.TINY_MODEL, seed=0):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").exists():
        sys.exit(f"bench-model: {tokenizer_dir} has no tokenizer; run `make tiny-model` first")
    vocab = orjson.loads((tokenizer_dir / "config.json").read_bytes())["vocab_size"]
    config = dict(BENCH_CONFIG, vocab_size=vocab)
    mx.random.seed(seed)
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    eos = config["eos_token_id"]
    model.lm_head.weight[eos] = 0.0
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    n_params = sum(v.size for v in weights.values())

    with atomic.staged_dir(out_dir) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_bytes(
            orjson.dumps(config, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        )
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, tmp / name)
    print(
        f"bench-model: wrote {out_dir} ({n_params / 1e6:.1f}M parameters, float32, "
        f"{n_params * 4 / 2**20:.0f} MiB)",
        file=sys.stderr,
    )
    return out_dir


def quantize(src, dst, bits=4, group_size=64):
    """A 4-bit copy through mlx-lm's own converter (for QLoRA and quantized decoding)."""
    from mlx_lm import convert

    if Path(dst).exists():
        shutil.rmtree(dst)
    convert(str(src), mlx_path=str(dst), quantize=True, q_bits=bits, q_group_size=group_size)
    print(f"bench-model: wrote {dst} ({bits}-bit)", file=sys.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(paths.BENCH_MODEL))
    parser.add_argument("--quantize", action="store_true", help="also write OUT-4bit with mlx_lm.convert")
    args = parser.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    build(args.out)
    if args.quantize:
        quantize(args.out, f"{args.out}-4bit")


if __name__ == "__main__":
    main()
