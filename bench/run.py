"""`make bench`: every measurement side by side with its anchor (mlx-lm), in one run.

    python -m bench.run [--quick] [--sections bandwidth,small_gemm,training,decode,...]
                        [--no-doc] [--keep-tmp]

Progress goes to stderr, the final table to stdout. Results (machine, exact commands, every
raw sample, medians, ratios, targets) go to bench/results/<date>-<HHMM>-<host>[-quick][-<sections>].json, a
section is appended to docs/PERFORMANCE.md, and the plots are
bench/results/<date>-<HHMM>-<host>[-quick]-concurrency.png and -workload.png.

Full mode (~8-12 min on 2 busy cores): training on models/tiny-mistral (the ~100M bench model
trains at ~50 tokens/s here, too slow for the budget), everything else on models/bench-mistral.
Quick mode (< 3 min): fewer repetitions, fewer iterations, shorter generations, concurrency
levels 1 and 8 only.

This file only chooses and orders: each measurement is a module of bench/ (SECTION, PLAN,
section(ctx), rows(res), and optionally models_note(plan) and plot(res, stem, doc)); what they
share is bench/common.py, what the run leaves behind bench/writeup.py (bench/README.md).
"""

import argparse
import datetime
import os
import shlex
import shutil
import socket
import sys
import tempfile
import traceback
from pathlib import Path

import bench  # noqa: F401  (fast BLAS before mlx)
from bench import (
    bandwidth,
    concurrency,
    decode,
    distributed,
    llamacpp,
    llamacpp_workload,
    machine,
    prefill,
    report,
    settings,
    small_gemm,
    training,
    ttft,
    workload,
    writeup,
)
from bench.common import DOC, RESULTS, Context, Workers, log, rel

# The order they run in. A new measurement is one more line here.
MEASUREMENTS = (
    bandwidth,
    small_gemm,
    settings,
    training,
    decode,
    concurrency,
    ttft,
    prefill,
    workload,
    distributed,
    llamacpp,
    llamacpp_workload,
)
# The order of the table's rows; a measurement's rows not placed here come after these.
TABLE = (
    training.rows,
    training.real_rows,
    distributed.rows,
    decode.rows,
    training.blas_rows,
    decode.blas_rows,
    settings.rows,
    concurrency.rows,
    ttft.rows,
    prefill.rows,
    small_gemm.rows,
    workload.rows,
    bandwidth.rows,  # decode against the bandwidth limit: after decode's own
)
SKIP = {"quick": ("concurrency",), "full": ()}  # quick: the workload's 1 and 8 users cover it
SECTIONS = tuple(m.SECTION for m in MEASUREMENTS)


def plan_for(mode):
    """Every measurement's settings for the mode, in one dict (the results' "plan")."""
    plan = {}
    for m in MEASUREMENTS:
        shared = set(plan) & set(m.PLAN[mode])
        if shared:
            raise ValueError(f"bench/{m.SECTION}.py: plan keys {sorted(shared)} are another section's")
        plan.update(m.PLAN[mode])
    plan["skip_sections"] = SKIP[mode]
    return plan


PLANS = {mode: plan_for(mode) for mode in ("quick", "full")}


def planned(quick):
    return [s for s in SECTIONS if s not in SKIP["quick" if quick else "full"]]


def build_rows(res):
    rows = [r for make in TABLE for r in make(res)]
    rest = [m.rows for m in MEASUREMENTS if hasattr(m, "rows") and m.rows not in TABLE]
    return rows + [r for make in rest for r in make(res)]


def models_note(plan, sections):
    notes = (m.models_note(plan) for m in MEASUREMENTS if m.SECTION in sections and hasattr(m, "models_note"))
    return "; ".join(notes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the short run (< 3 min)")
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset of "
        + ",".join(SECTIONS)
        + " (default: all; --quick leaves out concurrency, which the workload covers)",
    )
    p.add_argument("--no-doc", action="store_true", help="do not append to docs/PERFORMANCE.md")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary folder (logs, runs)")
    args = p.parse_args(argv)
    if args.sections is None:
        args.sections = ",".join(planned(args.quick))
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections: {', '.join(sorted(bad))}")
    return args


def check_models(plan):
    for m in {v for k, v in plan.items() if k.endswith("_model")}:
        if not (Path(m) / "config.json").exists():
            sys.exit(
                f"bench: {rel(m)} is missing; run `make tiny-model` / `make bench-model` (make bench does)"
            )


def start(argv, args, now, plan, stem):
    """The results' head: what ran, where, with which plan and targets."""
    mode = "quick" if args.quick else "full"
    return {
        "schema": 1,
        "mode": mode,
        "started": now.strftime("%Y-%m-%d %H:%M"),
        "command": shlex.join([rel(sys.executable), "-m", "bench.run", *argv]),
        "make_command": "make bench" + (" QUICK=1" if args.quick else ""),
        "machine": machine.describe(),
        "load_start": list(os.getloadavg()),
        "plan": {k: (rel(v) if isinstance(v, Path) else v) for k, v in plan.items()},
        "targets": {k: f"{op} {b:g}" for k, (op, b) in report.TARGETS.items()},
        "results_file": rel(f"{stem}.json"),
        "errors": {},
        "models_note": models_note(plan, args.sections),
    }


def measure(ctx, sections):
    """Each chosen measurement in order; one that fails is recorded and the others run."""
    for m in MEASUREMENTS:
        if m.SECTION not in sections:
            continue
        log(f"--- {m.SECTION}")
        try:
            m.section(ctx)
        except Exception as e:
            ctx.res["errors"][m.SECTION] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            log(f"{m.SECTION} FAILED: {type(e).__name__}: {e}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    check_models(plan)
    now = datetime.datetime.now()
    name = writeup.results_stem(
        now, socket.gethostname().split(".")[0], args.quick, args.sections, planned(args.quick)
    )
    stem = Path(args.results_dir) / name
    tmp = tempfile.mkdtemp(prefix="bench-")
    log(f"{mode} run, sections {','.join(args.sections)}; temporary files in {tmp}")
    res = start(argv, args, now, plan, stem)
    workers = Workers(tmp)
    try:
        measure(Context(plan=plan, tmp=Path(tmp), res=res, workers=workers), args.sections)
    finally:
        workers.stop_all()
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return writeup.finish(res, build_rows(res), MEASUREMENTS, stem, args.doc, write_doc=not args.no_doc)


if __name__ == "__main__":
    sys.exit(main())
