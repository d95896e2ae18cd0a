"""Training throughput in 1 process vs N processes (train.launch / mlx.launch, ring backend on
this machine), the same global batch, the same data.

    python -m bench.distributed [--nproc 1,2] [--global-batch 8] [--iters 20] [--repeats 3]
                                [--model models/tiny-mistral] [--json out.json]

For each process count k: `python -m train.train --batch-size G` (k = 1) or
`python -m train.launch --nproc k -- ... --batch-size G/k`, LoRA on the tiny model by default,
in a temporary MODELS_DIR/LOGS_DIR. Tokens/s = tokens trained (the whole global batch) between
step `warmup` and the last step / the time between them, from rank 0's logs/NAME/metrics.jsonl
(so model loading, the first compiled steps and the step-0 evaluation are left out; no
checkpoint or evaluation falls in between). The median of `repeats` runs is reported.

From code: `bench.distributed.measure(...) -> dict` (signature below); the table goes to stderr.
On one machine the processes share its cores and memory bandwidth: expect no speed-up on a
CPU box; the point of several processes is several Macs.

`make bench` section **distributed** (`section`, `rows`; the full run only): NPROC=2 vs 1.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench import report
from bench.common import ROOT, TINY, log
from core import paths

PY = sys.executable
SECTION = "distributed"
PLAN = {"quick": dict(dist_repeats=0), "full": dict(dist_repeats=2, dist_iters=20)}


def _config(path, model, iters):
    cfg = {
        "model": str(model),
        "seed": 0,
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": 4, "scale": 4.0, "dropout": 0.0},
        "iters": iters,
        "learning_rate": 3e-4,
        "lr_schedule": {"name": "constant"},
        "max_seq_length": 256,
        "steps_per_report": 1,
        "steps_per_eval": 10 * iters,
        "save_every": 10 * iters,
        "keep_last": 1,
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _throughput(metrics_file, warmup):
    records = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("train_loss") is not None]
    first = next(r for r in steps if r["step"] >= warmup)
    last = steps[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])


def measure(
    nprocs=(1, 2), global_batch=8, iters=20, repeats=3, warmup=3, model=TINY, data=None, timeout=600, log=None
):
    """Training tokens/s for each process count in `nprocs` at the same global batch size.

    Returns {"global_batch": G, "iters": N, "warmup_steps": W, "model": str,
             "rows": [{"nproc": k, "batch_size_per_process": G // k,
                       "tokens_per_s": [sample, ...], "median_tokens_per_s": x,
                       "wall_s": [...], "command": "..."}, ...],
             "speedup": {"2": median(k=2) / median(k=1), ...}}
    and prints a table to stderr (log=None) or through log(line)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        tmp = Path(tmp)
        if data is None:
            data = tmp / "data"
            subprocess.run(
                [PY, "-m", "train.prepare_data", "--out", str(data), "--raw", str(ROOT / "data" / "sample")],
                cwd=ROOT,
                check=True,
                capture_output=True,
                timeout=120,
            )
        config = _config(tmp / "bench.yaml", model, iters)
        env = paths.env_with_outputs_in(tmp)
        for k in nprocs:
            if global_batch % k:
                raise ValueError(f"global batch {global_batch} is not a multiple of {k} processes")
            row = {"nproc": k, "batch_size_per_process": global_batch // k, "tokens_per_s": [], "wall_s": []}
            for i in range(repeats):
                name = f"p{k}-{i}"
                args = [
                    "--config",
                    str(config),
                    "--name",
                    name,
                    "--data",
                    str(data),
                    "--batch-size",
                    str(global_batch // k),
                    "--fresh",
                ]
                cmd = (
                    [PY, "-m", "train.train", *args]
                    if k == 1
                    else [PY, "-m", "train.launch", "--nproc", str(k), "--", *args]
                )
                row["command"] = " ".join(cmd)
                start = time.perf_counter()
                proc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )
                row["wall_s"].append(round(time.perf_counter() - start, 2))
                if proc.returncode != 0:
                    raise RuntimeError(f"{row['command']} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
                tps = _throughput(tmp / "logs" / name / "metrics.jsonl", warmup)
                row["tokens_per_s"].append(round(tps, 1))
                log(f"  nproc {k} run {i + 1}/{repeats}: {tps:,.0f} tokens/s")
            row["median_tokens_per_s"] = round(statistics.median(row["tokens_per_s"]), 1)
            rows.append(row)
    base = rows[0]["median_tokens_per_s"]
    result = {
        "global_batch": global_batch,
        "iters": iters,
        "warmup_steps": warmup,
        "model": str(model),
        "rows": rows,
        "speedup": {str(r["nproc"]): round(r["median_tokens_per_s"] / base, 3) for r in rows},
    }
    log(f"training throughput, global batch {global_batch}, {iters} steps (median of {repeats}):")
    log(f"  {'processes':>9} | {'batch/process':>13} | {'tokens/s':>9} | {'vs 1':>5} | samples")
    for r in rows:
        log(
            f"  {r['nproc']:>9} | {r['batch_size_per_process']:>13} | {r['median_tokens_per_s']:>9,.0f} | "
            f"{result['speedup'][str(r['nproc'])]:>5.2f} | {', '.join(f'{x:,.0f}' for x in r['tokens_per_s'])}"
        )
    return result


def section(ctx):
    """Training tokens/s with NPROC=1 and NPROC=2 (mlx.launch) at the same global batch."""
    plan = ctx.plan
    if not plan["dist_repeats"]:
        log("distributed: skipped in the quick run")
        return
    ctx.res[SECTION] = measure(nprocs=(1, 2), iters=plan["dist_iters"], repeats=plan["dist_repeats"], log=log)


def rows(res):
    dist = res.get(SECTION)
    if not (dist and len(dist.get("rows", [])) == 2):
        return []
    one, two = dist["rows"]
    return [
        report.row(
            "training tokens/s, NPROC=2 vs 1",
            two["median_tokens_per_s"],
            one["median_tokens_per_s"],
            "tok/s",
            ours_label="NPROC=2 (mlx.launch)",
            anchor_label="NPROC=1",
            note=f"global batch {dist['global_batch']}, "
            f"{dist['iters']} iters, {dist['model']}; one machine: no speed-up expected",
        )
    ]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="process counts, comma-separated (default 1,2)")
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=str(TINY))
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    result = measure(
        tuple(int(x) for x in args.nproc.split(",")),
        args.global_batch,
        args.iters,
        args.repeats,
        model=args.model,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
