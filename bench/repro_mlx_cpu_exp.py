"""Minimal reproducer: on x86-64 Linux, mlx's CPU backend computes exp (and so the softmax in
attention) one float at a time, ~10-15x slower than a vectorised exp on the same core; on an
uncached 1,000-token prompt that softmax is most of the prefill time.

    python -m bench.repro_mlx_cpu_exp [--tokens 1000] [--heads 12] [--layers 16]

Prints, for the attention score tensor of one prompt ([heads, n, n] per layer, float32):
  - mx.exp, mx.softmax(precise=True) and mx.fast.scaled_dot_product_attention(causal) through mlx,
  - numpy's exp of the same array (numpy's AVX2/AVX-512 exp, one thread) for comparison,
  - the sgemm work of the same layer (the model's linear products) for scale,
and the elements per second of each exp. Nothing here depends on this project but the model
shape (models/bench-mistral's by default). A profile (perf record -g, docs/PERFORMANCE.md)
shows the time in mlx's `simd::exp<float, 1>` (the scalar path of the x86-64 wheel: a simd
width of 1) calling libm's `fmaf` out of line (`__fmaf_fma3`) for every element.
"""

import argparse
import os
import sys
import time

import bench  # noqa: F401  (the same BLAS as everything else)


def best_of(fn, n=3):
    fn()
    best = float("inf")
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - tic)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.repro_mlx_cpu_exp", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    args = p.parse_args(argv)
    import mlx.core as mx
    import numpy as np

    n, h, kv, d, L = args.tokens, args.heads, args.kv_heads, args.head_dim, args.layers
    scores = mx.random.normal((1, h, n, n))
    q, k, v = mx.random.normal((1, h, n, d)), mx.random.normal((1, kv, n, d)), mx.random.normal((1, kv, n, d))
    hid, inter = args.hidden, args.intermediate
    shapes = [
        (h * d, hid),
        (kv * d, hid),
        (kv * d, hid),
        (hid, h * d),
        (inter, hid),
        (inter, hid),
        (hid, inter),
    ]
    ws = [mx.random.normal(s) for s in shapes]
    xs = {i: mx.random.normal((n, i)) for _, i in shapes}
    mx.eval(scores, q, k, v, ws, list(xs.values()))
    scores_np = np.asarray(scores)

    t = {
        "mx.exp": best_of(lambda: mx.eval(mx.exp(scores))),
        "mx.softmax(precise=True)": best_of(lambda: mx.eval(mx.softmax(scores, axis=-1, precise=True))),
        "mx.fast.scaled_dot_product_attention (causal)": best_of(
            lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask="causal"))
        ),
        "numpy exp (1 thread)": best_of(lambda: np.exp(scores_np)),
        "linear layers (sgemm, the loaded BLAS)": best_of(
            lambda: mx.eval([xs[w.shape[1]] @ w.T for w in ws])
        ),
    }
    elements = h * n * n
    print(
        f"mlx {mx.__version__}, {n} tokens, {h} heads, per layer (x{L} layers for the prompt); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    for name, sec in t.items():
        rate = f"  ({elements / sec / 1e6:,.0f} M exp/s)" if "exp" in name else ""
        print(f"  {name:<48} {sec * 1e3:9.1f} ms per layer, {sec * L:7.2f} s per prompt{rate}")
    print(
        f"  mlx exp is {t['mx.exp'] / t['numpy exp (1 thread)']:.1f}x slower than numpy's; the attention takes "
        f"{t['mx.fast.scaled_dot_product_attention (causal)'] / t['linear layers (sgemm, the loaded BLAS)']:.1f}x "
        "the time of all the layer's matrix products"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
