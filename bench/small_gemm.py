"""The products decoding makes, our kernel against the BLAS, in one process:

    python -m bench.small_gemm [--model models/bench-mistral] [--m 1,2,4,8,16] [--reps 5]

For each M (streams in the decode batch): M rows of activations times every weight matrix of
the model (x @ W^T, the weights where mlx mapped them), once through the loaded BLAS's own
cblas_sgemm and once through core/native/small_gemm.c's, alternating, `--reps` times; the
median time of each and the median of the paired ratios. Needs the library (`make setup` on
Linux with a C compiler); prints why not otherwise.

`make bench` section **small_gemm** (`section`, `rows`): the same at M = 1 and 8 (quick) or
1, 4, 8, 16 (full) on the decode model: the read rate of decoding's products, ours vs the BLAS.
"""

import argparse
import ctypes
import sys
import time
from pathlib import Path

import bench  # noqa: F401  (fast BLAS before mlx)
from bench import report
from bench.common import log

SECTION = "small_gemm"
PLAN = {
    "quick": dict(small_gemm_m=[1, 8], small_gemm_reps=3),
    "full": dict(small_gemm_m=[1, 4, 8, 16], small_gemm_reps=5),
}


def weight_views(model_dir):
    """The model's 2-D weights (not the embedding) as numpy views of mlx's own buffers."""
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(model_dir))
    weights = [v for k, v in tree_flatten(model.parameters()) if v.ndim == 2 and "embed" not in k]
    return model, [np.asarray(memoryview(w)) for w in weights]


def products(fn, views, m):
    """A closure running y = x @ W^T for every view through the cblas_sgemm `fn`."""
    import numpy as np

    P, N, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    fn.argtypes = [N] * 6 + [F, P, N, P, N, F, P, N]
    xs = {w.shape[1]: np.ones((m, w.shape[1]), np.float32) for w in views}
    calls = [(w, xs[w.shape[1]], np.zeros((m, w.shape[0]), np.float32)) for w in views]

    def run():
        for w, x, y in calls:
            n, k = w.shape
            fn(101, 111, 112, m, n, k, 1.0, x.ctypes.data, k, w.ctypes.data, k, 0.0, y.ctypes.data, n)

    return run


def measure(model_dir, ms=(1, 8), reps=5):
    """{"skipped": reason} or {"weights_bytes", "m": {M: {"blas_s", "small_s", "paired"}}}."""
    from core import blas

    if blas.small_gemm is None:
        return {"skipped": f"small_gemm not loaded ({blas.SMALL_GEMM_PATH} absent or SMALL_GEMM=0)"}
    _model, views = weight_views(model_dir)  # the model keeps the buffers alive
    ours, theirs = blas.small_gemm.cblas_sgemm, ctypes.CDLL(blas.loaded_path).cblas_sgemm
    out = {"weights_bytes": sum(w.nbytes for w in views), "blas": blas.loaded_path, "m": {}}
    for m in ms:
        runs = {"blas": products(theirs, views, m), "small": products(ours, views, m)}
        times = {"blas": [], "small": []}
        for _ in range(reps + 1):  # the first pair warms up and is left out
            for name, run in runs.items():
                tic = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - tic)
        blas_t, small_t = times["blas"][1:], times["small"][1:]
        out["m"][m] = {
            "blas_s": report.median(blas_t),
            "small_s": report.median(small_t),
            "paired": report.paired_ratio(blas_t, small_t),
        }
    return out


def section(ctx):
    """Decoding's products over the decode model's weights: core/native/small_gemm.c vs the BLAS."""
    plan = ctx.plan
    out = measure(plan["decode_model"], plan["small_gemm_m"], plan["small_gemm_reps"])
    ctx.res[SECTION] = out
    if "skipped" in out:
        log(f"small_gemm: {out['skipped']}")
    for m, r in out.get("m", {}).items():
        log(
            f"small_gemm M={m}: {r['small_s'] * 1e3:.1f} ms vs BLAS {r['blas_s'] * 1e3:.1f} ms ({r['paired']:.2f}x)"
        )


def rows(res):
    """Read rates (weight bytes / time) of decoding's products at each M, ours vs the BLAS."""
    sg = res.get(SECTION)
    if not sg or "m" not in sg:
        return []
    gb = sg["weights_bytes"] / 1e9
    return [
        report.row(
            f"decode products x @ W^T, M={m} (read rate)",
            gb / r["small_s"],
            gb / r["blas_s"],
            "GB/s",
            ours_label="small_gemm",
            anchor_label=Path(sg["blas"]).name,
            paired=r["paired"],
        )
        for m, r in sg["m"].items()
    ]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.small_gemm", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/bench-mistral")
    p.add_argument("--m", default="1,2,4,8,16")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    res = measure(args.model, [int(m) for m in args.m.split(",")], args.reps)
    if "skipped" in res:
        print(res["skipped"])
        return 0
    gb = res["weights_bytes"] / 1e9
    print(f"{res['weights_bytes'] / 1e6:.0f} MB of weights; BLAS {res['blas']}")
    for m, r in res["m"].items():
        print(
            f"  M={m:<3} BLAS {r['blas_s'] * 1e3:6.1f} ms ({gb / r['blas_s']:4.1f} GB/s)   "
            f"small_gemm {r['small_s'] * 1e3:6.1f} ms ({gb / r['small_s']:4.1f} GB/s)   {r['paired']:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
