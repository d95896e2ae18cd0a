"""What core/calibrate.py times in each child process: decoding and training steps of the model
shapes this project ships, with constant float32 weights made in memory (no files, no hub).

    python -m core.calibrate_work --work decode:bench:1,train:smollm2 [--tokens 24]

prints one JSON line: what this process loaded (core.blas.loaded_state()) and, per work item,
tokens per second. A work item is KIND:SHAPE[:STREAMS]: decode (greedy, pipelined as
mlx_lm.generate_step is: the next step is built while the current one runs, on its own stream)
of STREAMS streams after a 16-token prompt (--tokens steps timed after one that is not), or train (LoRA rank 8 on every layer, forward and
backward of TRAIN_BATCH x TRAIN_TOKENS tokens through TRAIN_LAYERS of the shape's blocks: the
large products training makes). --kernel-modes times each decode item once per row range of
core/native/small_gemm.c (KERNEL_MODES), switched within the process, so that those
comparisons are paired as closely as a shared machine allows.
"""

import argparse
import json
import sys
import time

import core  # noqa: F401  (the BLAS, as this process's settings say, before mlx)

# The shapes we ship, as mlx-lm model configs (float32). tiny and bench mirror
# train/tiny_model.py's TINY_CONFIG and bench/bench_model.py's BENCH_CONFIG (a test checks they
# agree); smollm2 is HuggingFaceTB/SmolLM2-135M's architecture.
_BASE = {
    "model_type": "mistral",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 2048,
}
SHAPES = {
    "tiny": dict(
        _BASE,
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=384,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    "bench": dict(
        _BASE,
        hidden_size=768,
        num_hidden_layers=16,
        intermediate_size=2048,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
    ),
    "smollm2": dict(
        _BASE,
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        vocab_size=49152,
    ),
}
PROMPT_TOKENS = 16
TRAIN_BATCH, TRAIN_TOKENS = 2, 128
TRAIN_LAYERS = 4  # training items keep each shape's products but time 4 of its blocks
# core/native/small_gemm.c's row ranges tried within one process (--kernel-modes): (min M, max M)
KERNEL_MODES = {"off": (1, 0), "all": (1, 128), "from4": (4, 128)}


def parse_work(text):
    """'decode:bench:4,train:tiny' -> [("decode", "bench", 4), ("train", "tiny", 1)]; ValueError
    naming the bad item."""
    items = []
    for item in text.split(","):
        parts = item.split(":")
        kind, shape = parts[0], parts[1] if len(parts) > 1 else ""
        if kind not in ("decode", "train") or shape not in SHAPES or len(parts) > 3:
            raise ValueError(f"work item {item!r}: expected decode|train:{'|'.join(SHAPES)}[:STREAMS]")
        streams = int(parts[2]) if len(parts) == 3 else 1
        if streams < 1:
            raise ValueError(f"work item {item!r}: STREAMS must be >= 1")
        items.append((kind, shape, streams))
    return items


def make_model(shape, layers=None):
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes

    config = dict(SHAPES[shape], num_hidden_layers=layers or SHAPES[shape]["num_hidden_layers"])
    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    # constant weights: the products take as long, and the random ones are never computed
    model.update(tree_map(lambda p: mx.full(p.shape, 0.02, p.dtype), model.parameters()))
    mx.eval(model.parameters())
    return model


def decode_rates(model, streams, tokens, modes=(None,), set_mode=None):
    """{mode: tokens per second, all streams}: one prompt, then per mode (set_mode(mode) first)
    a step not timed and `tokens` greedy steps, timed."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    stream = mx.new_stream(mx.default_device())
    cache = make_prompt_cache(model)
    prompt = mx.array([[3 + (i + s) % 1000 for i in range(PROMPT_TOKENS)] for s in range(streams)])

    def step(y):
        with mx.stream(stream):
            return mx.argmax(model(y, cache=cache)[:, -1, :], axis=-1)[:, None]

    y = step(prompt)
    mx.eval(y)
    out = {}
    for mode in modes:
        if set_mode:
            set_mode(mode)
        y = step(y)
        mx.eval(y)
        y = step(y)
        mx.async_eval(y)
        tic = time.perf_counter()
        for _ in range(tokens):
            nxt = step(y)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        out[mode] = streams * (tokens + 1) / (time.perf_counter() - tic)
    return out


def train_rate(model, steps):
    """Tokens per second of LoRA forward + backward steps (after one to warm)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0})
    tokens = mx.random.randint(3, 1000, (TRAIN_BATCH, TRAIN_TOKENS + 1))

    def loss(m, x, y):
        return nn.losses.cross_entropy(m(x), y).mean()

    grad = nn.value_and_grad(model, loss)
    mx.eval(grad(model, tokens[:, :-1], tokens[:, 1:]))
    tic = time.perf_counter()
    for _ in range(steps):
        mx.eval(grad(model, tokens[:, :-1], tokens[:, 1:]))
    return steps * TRAIN_BATCH * TRAIN_TOKENS / (time.perf_counter() - tic)


def run(items, tokens, train_steps, modes=()):
    """{"kind:shape:streams": tokens/s} for each work item, in order; with kernel `modes`, each
    decode item once per mode ("decode:bench:1|from4"), the modes in turn (rotating the order)."""
    from core import blas

    out, models = {}, {}
    kernel = blas.small_gemm if modes else None
    loaded = kernel and (kernel.small_gemm_min_m(), kernel.small_gemm_max_m())
    for i, (kind, shape, streams) in enumerate(items):
        if kind == "train":
            out[f"train:{shape}"] = train_rate(make_model(shape, layers=TRAIN_LAYERS), train_steps)
            continue
        model = models.get(shape) or models.setdefault(shape, make_model(shape))
        key = f"decode:{shape}:{streams}"
        if kernel is None:
            out[key] = decode_rates(model, streams, tokens)[None]
            continue
        order = modes[i % len(modes) :] + modes[: i % len(modes)]
        rates = decode_rates(
            model, streams, tokens, order, lambda m: kernel.small_gemm_set_range(*KERNEL_MODES[m])
        )
        out.update({f"{key}|{mode}": rates[mode] for mode in modes})
        kernel.small_gemm_set_range(*loaded)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m core.calibrate_work", description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="e.g. decode:bench:1,decode:bench:8,train:bench")
    p.add_argument("--tokens", type=int, default=8, help="decode steps timed per item and mode")
    p.add_argument("--train-steps", type=int, default=2)
    p.add_argument("--kernel-modes", default="", help=f"comma-separated, of {', '.join(KERNEL_MODES)}")
    args = p.parse_args(argv)
    modes = [m for m in args.kernel_modes.split(",") if m]
    try:
        items = parse_work(args.work)
        if set(modes) - set(KERNEL_MODES):
            raise ValueError(
                f"--kernel-modes {args.kernel_modes!r}: expected some of {', '.join(KERNEL_MODES)}"
            )
    except ValueError as e:
        p.error(str(e))
    from core import blas

    if modes and blas.small_gemm is None:
        p.error(
            "--kernel-modes: core/native/small_gemm.c is not loaded in this process (SMALL_GEMM=0 or not built)"
        )
    rates = run(items, args.tokens, args.train_steps, modes)
    print(json.dumps({"loaded": blas.loaded_state(), "rates": rates}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
