"""Where one CPU decode step goes beyond its products: mlx's per-op cost, in one process.

    python -m bench.repro_mlx_cpu_dispatch [--model models/bench-mistral]

1. The cost of one small op: a chain of 400 elementwise ops on a (1, 768) float32 array
   (what norms, RoPE and attention are made of at one token), microseconds per op.
2. The ops of one decode step of the model (mlx-lm, KV cache, one token), counted by type from
   the graph (`mx.export_to_dot`): on the CPU the fast ops (rms_norm, rope, attention) have no
   kernel and run as their fallback graphs.
3. `nn.RoPE` at one token (1, 12, 1, 64), 32 calls as in a 16-layer step: as mlx-lm calls it,
   and the same call under `mx.compile` (fused, bitwise equal), microseconds per call.
4. One decode step against its products alone (every weight matrix, x @ W^T, one graph).
5. A pipelined decode (`stream_generate`, 200 tokens): the CPU time each thread spends per
   token (Linux: /proc/self/task), against the wall time. On 2 cores the Python thread (building
   the next step), mlx's stream thread (every op, and its share of the products) and the
   products' helper threads share the two CPUs.

mlx 0.32.4 on the 2-core AMD EPYC: ~4 us per op; ~2,200 nodes per step; RoPE 57-99 us per call
(25-36 us compiled); step 23-25 ms of which products 14-17 ms; pipelined, ~42 ms of CPU a token
over ~25 ms of wall time: products ~24, the rest ~17 (docs/PERFORMANCE.md).
"""

import argparse
import collections
import io
import os
import re
import sys
import time

import bench  # noqa: F401  (fast BLAS before mlx)
from bench.decode_parts import median_time


def median_us(fn, n=20):
    return median_time(fn, n) * 1e6


def per_op_us(mx, ops=400):
    x = mx.ones((1, 768))
    mx.eval(x)

    def chain():
        y = x
        for _ in range(ops // 2):
            y = y * 1.0001 + 0.5
        mx.eval(y)

    return median_us(chain) / ops


def step_ops(mx, model, cache):
    out = model(mx.array([[5]]), cache=cache)
    dot = io.StringIO()
    mx.export_to_dot(dot, out)
    return collections.Counter(re.findall(r'label ="([A-Za-z]+)', dot.getvalue()))


def rope_us(mx, nn):
    rope = nn.RoPE(64, base=1e6)
    compiled = mx.compile(
        lambda x, off: mx.fast.rope(x, 64, traditional=False, base=1e6, scale=1.0, offset=off)
    )
    x, off = mx.random.normal((1, 12, 1, 64)), mx.array([100])
    mx.eval(x, off)
    equal = mx.array_equal(rope(x, offset=off), compiled(x, off)).item()
    plain = median_us(lambda: mx.eval([rope(x, offset=off) for _ in range(32)])) / 32
    fused = median_us(lambda: mx.eval([compiled(x, off) for _ in range(32)])) / 32
    return plain, fused, equal


def thread_cpu_s():
    """{(thread id, name): CPU seconds} of this process; {} where /proc is absent (macOS)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return {}
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(tasks):
        try:
            stat = open(f"{tasks}/{tid}/stat").read()
        except OSError:  # the thread ended
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        out[(int(tid), name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def thread_label(tid, name):
    if tid == os.getpid():  # Linux: the main thread's id is the process id
        return "Python (main thread)"
    if name == "small_gemm":
        return f"small_gemm helper {tid}"
    return f"{name} {tid}"  # mlx's stream thread is unnamed: the busiest of these


def pipelined_cpu_ms(model, tokenizer, tokens=200):
    """(wall ms per token, [(thread, CPU ms per token)], busiest first) of the decode
    `python -m bench.decode_env` times (greedy stream_generate after a 100-token prompt)."""
    from bench.anchors import stream_generate_once
    from bench.decode_env import PROMPT_IDS

    stream_generate_once(model, tokenizer, PROMPT_IDS, 8)  # warm
    before, tic = thread_cpu_s(), time.perf_counter()
    n = stream_generate_once(model, tokenizer, PROMPT_IDS, tokens)["completion_tokens"]
    wall, after = time.perf_counter() - tic, thread_cpu_s()
    spent = {t: (after[t] - before.get(t, 0.0)) * 1e3 / n for t in after}
    rows = sorted(((ms, thread_label(*t)) for t, ms in spent.items() if ms >= 0.2), reverse=True)
    return wall * 1e3 / n, [(label, ms) for ms, label in rows]


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.repro_mlx_cpu_dispatch", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="models/bench-mistral")
    args = p.parse_args(argv)
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    mx.set_default_device(mx.cpu)
    print(f"mlx {mx.__version__}, CPU")
    op = per_op_us(mx)
    print(f"1. one small elementwise op: {op:.1f} us")
    model, tokenizer = load(args.model)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
    ops = step_ops(mx, model, cache)
    total = sum(ops.values())
    print(
        f"2. one decode step: {total} graph nodes ({total * op / 1e3:.1f} ms at {op:.1f} us each); by type:"
    )
    print("   " + ", ".join(f"{name} {n}" for name, n in ops.most_common(16)))
    plain, fused, equal = rope_us(mx, nn)
    print(
        f"3. nn.RoPE, one token: {plain:.0f} us per call; under mx.compile {fused:.0f} us (bitwise equal: {equal})"
    )
    weights = [v for k, v in tree_flatten(model.parameters()) if v.ndim == 2 and "embed" not in k]
    xs = {w.shape[1]: mx.ones((1, w.shape[1])) for w in weights}
    products = median_us(lambda: mx.eval([xs[w.shape[1]] @ w.T for w in weights])) / 1e3
    step = median_us(lambda: mx.eval(model(mx.array([[5]]), cache=cache))) / 1e3
    print(
        f"4. decode step {step:.1f} ms; its products alone {products:.1f} ms; the rest {step - products:.1f} ms"
    )
    wall, threads = pipelined_cpu_ms(model, tokenizer)
    if not threads:
        print("5. CPU time per thread: not measured (no /proc/self/task on this platform)")
        return 0
    total = sum(ms for _, ms in threads)
    print(
        f"5. pipelined decode: {wall:.1f} ms a token wall, {total:.1f} ms CPU ({total / wall:.2f} CPUs busy); "
        + ", ".join(f"{label} {ms:.1f}" for label, ms in threads)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
