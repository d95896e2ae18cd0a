"""Which BLAS the worker should get: the same worker measurements under several BLAS setups,
interleaved (one worker per setup, all alive, round-robin), medians.

    python -m bench.blas_ab [--model models/bench-mistral] [--rounds 3] [--mkl /path/libmkl_rt.so.3]

Setups: the default (what core/blas.py loads), OPENBLAS_CORETYPE forced to the CPU's real
family (OpenBLAS 0.3.21 falls back to its SSE3 "Prescott" kernels on CPUs it does not know,
e.g. family 6 model 207), FAST_BLAS=0 with --reference (slow), and with --mkl, Intel MKL
(`pip install mkl` puts libmkl_rt.so.3 in <venv>/lib). Per setup: single-stream decode
tokens/s (client side), aggregate tokens/s of 8 concurrent requests, and the uncached time
to first token of a ~800-token prompt; medians, and in brackets the median over rounds of
each round's ratio to the default (the machine's load drifts between rounds). Writes bench/results/<date>-<host>-blas.json.
"""

import argparse
import datetime
import os
import socket
import statistics
import sys
from pathlib import Path

import bench  # noqa: F401
from bench import machine, report
from bench.common import BENCH, RESULTS, log, rel, sub_env
from bench.concurrency import worker_once as conc_worker
from bench.decode import worker_once as decode_worker_once
from bench.worker_client import WorkerProcess
from core.blas import openblas_coretype


def setups(mkl=None, reference=False):
    out = {"default": {}}
    core = openblas_coretype()
    if core:
        out[f"OPENBLAS_CORETYPE={core}"] = {"OPENBLAS_CORETYPE": core}
    if reference:  # slow: ~10x longer prompts
        out["FAST_BLAS=0"] = {"FAST_BLAS": "0"}
    if mkl:
        out["MKL"] = {"FAST_BLAS_LIB": str(mkl)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.blas_ab", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BENCH))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reference", action="store_true", help="also FAST_BLAS=0 (mlx's reference BLAS; slow)")
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--mkl", help="path of libmkl_rt.so.3 to include Intel MKL")
    args = p.parse_args(argv)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    system = "Facto: o Sporting Clube Farense foi fundado em 1910 em Faro. " * 40
    workers, res = {}, {}
    try:
        for name, extra in setups(args.mkl, args.reference).items():
            log(f"starting worker: {name}")
            w = WorkerProcess(
                ["--model", args.model], env=sub_env(**extra), stderr_path=tmp / f"blas-ab-{os.getpid()}.log"
            ).start()
            decode_worker_once(w, 4)
            workers[name] = w
            res[name] = {
                "env": extra,
                "blas": w.ready.get("blas"),
                "decode": [],
                "concurrent8": [],
                "ttft_ms": [],
            }
        for rnd in range(args.rounds):
            for name, w in workers.items():
                r = res[name]
                r["decode"].append(decode_worker_once(w, args.tokens)["tokens_per_s"])
                r["concurrent8"].append(conc_worker(w, 8, 32, f"ab{rnd}")["aggregate_tokens_per_s"])
                g = w.generate(
                    {
                        "messages": [
                            {"role": "system", "content": f"{rnd}-{name}: {system}"},
                            {"role": "user", "content": "Olá"},
                        ],
                        "max_tokens": 1,
                        "stream": True,
                    }
                )
                r["ttft_ms"].append(g.client_ttft_s() * 1000.0)
                log(
                    f"round {rnd + 1}/{args.rounds} {name}: decode {r['decode'][-1]:.1f} tok/s, "
                    f"8 concurrent {r['concurrent8'][-1]:.1f} tok/s, ttft {r['ttft_ms'][-1]:.0f} ms "
                    f"({g.done['usage']['prompt_tokens']} tokens)"
                )
    finally:
        for w in workers.values():
            w.close()
    base = res.get("default")
    lines = ["| setup | decode tok/s | 8 concurrent tok/s | uncached ttft ms |", "|---|---|---|---|"]
    for name, r in res.items():
        for k in ("decode", "concurrent8", "ttft_ms"):
            r[k + "_median"] = statistics.median(r[k]) if r[k] else None
            # the load drifts: each round's ratio to the default of the same round, then the median
            r[k + "_paired_ratio"] = (
                report.median([report.ratio(a, b) for a, b in zip(r[k], base[k])]) if base else None
            )
        rel_ = lambda k, r=r, name=name: (
            f" ({report.fmt(r[k + '_paired_ratio'])}x)" if base and name != "default" else ""
        )
        lines.append(
            f"| {name} | {report.fmt(r['decode_median'])}{rel_('decode')} | "
            f"{report.fmt(r['concurrent8_median'])}{rel_('concurrent8')} | "
            f"{report.fmt(r['ttft_ms_median'])}{rel_('ttft_ms')} |"
        )
    table = "\n".join(lines) + "\n"
    now = datetime.datetime.now()
    out = RESULTS / f"{now:%Y-%m-%d}-{socket.gethostname().split('.')[0]}-blas.json"
    report.write_json(
        out,
        {
            "started": now.strftime("%Y-%m-%d %H:%M"),
            "machine": machine.describe(),
            "command": " ".join([rel(sys.executable), "-m", "bench.blas_ab", *(argv or sys.argv[1:])]),
            "model": rel(args.model),
            "rounds": args.rounds,
            "tokens": args.tokens,
            "load": list(os.getloadavg()),
            "setups": res,
            "table": table,
        },
    )
    sys.stdout.write(table)
    log(f"wrote {rel(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
