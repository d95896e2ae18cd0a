"""Where one decode step's time goes against the memory bandwidth, in one process:

    python -m bench.decode_parts [--model models/bench-mistral] [--rounds 2]

Per round: the read bandwidth (numpy sum, 1 and 2 threads, best pass); the model's weight
products at M=1 called straight into the loaded BLAS (cblas_sgemv and cblas_sgemm through
ctypes, numpy buffers), the same products through mlx (`x @ w.T`, one graph), and one real
decode step of the model (mlx-lm, KV cache). Each as milliseconds and the read rate it implies
(weight bytes / time). On MKL, MKL_DYNAMIC=FALSE / MKL_NUM_THREADS=1 in the environment show
the effect of its thread choice.
"""

import argparse
import ctypes
import os
import statistics
import sys
import time

import bench  # noqa: F401  (fast BLAS before mlx)


def median_time(fn, n=15):
    fn()
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def blas_calls(weights):
    """(sgemv, sgemm) closures over numpy copies of the weights, straight into the loaded BLAS."""
    import numpy as np

    from bench import small_gemm
    from core import blas

    if not blas.loaded_path:
        return None, None
    lib = ctypes.CDLL(blas.loaded_path)
    P, N, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.cblas_sgemv.argtypes = [N, N, N, N, F, P, N, P, N, F, P, N]
    ws = [np.array(w, dtype=np.float32, copy=True) for w in weights]  # own memory, not mlx's
    xs = {w.shape[1]: np.ones(w.shape[1], np.float32) for w in ws}
    ys = [np.zeros(w.shape[0], np.float32) for w in ws]
    args = [
        (w.shape[0], w.shape[1], w.ctypes.data, xs[w.shape[1]].ctypes.data, y.ctypes.data)
        for w, y in zip(ws, ys)
    ]

    keep = (ws, xs, ys)  # the buffers must outlive the closures (args holds raw pointers)

    def gemv(_keep=keep):  # row-major, no transpose: y = W x
        for n, k, w, x, y in args:
            lib.cblas_sgemv(101, 111, n, k, 1.0, w, k, x, 1, 0.0, y, 1)

    # y (1 x n) = x (1 x k) @ W^T, as mlx calls it
    return gemv, small_gemm.products(lib.cblas_sgemm, ws, 1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.decode_parts", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bench-mistral")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from bench import machine

    model, _ = load(args.model)
    weights = [v for k, v in tree_flatten(model.parameters()) if v.ndim == 2 and "embed" not in k]
    nbytes = sum(w.nbytes for w in weights)
    xs = {w.shape[1]: mx.ones((1, w.shape[1])) for w in weights}
    mx.eval(list(xs.values()))
    gemv, gemm = blas_calls(weights)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
    token = mx.array([[5]])
    parts = {
        "BLAS cblas_sgemv (ctypes)": gemv,
        "BLAS cblas_sgemm M=1 (ctypes)": gemm,
        "mlx x @ w.T, one graph": lambda: mx.eval([xs[w.shape[1]] @ w.T for w in weights]),
        "one decode step (mlx-lm)": lambda: mx.eval(model(token, cache=cache)),
    }
    for rnd in range(args.rounds):
        bw1 = max(machine.memory_read_bandwidth(0.5, threads=1, repeats=4, samples=True))
        bw2 = max(machine.memory_read_bandwidth(0.5, threads=2, repeats=4, samples=True))
        print(
            f"round {rnd + 1}, load {os.getloadavg()[0]:.2f}: {nbytes / 1e6:.0f} MB of weights; numpy read "
            f"{bw1 / 1e9:.1f} GB/s (1 thread), {bw2 / 1e9:.1f} GB/s (2 threads) -> {nbytes / bw2 * 1e3:.1f} ms"
        )
        for name, fn in parts.items():
            if fn is None:
                continue
            t = median_time(fn)
            print(f"  {name:<32} {t * 1e3:7.1f} ms  {nbytes / t / 1e9:5.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
