"""`make check-backend`: does this machine's mlx backend (Metal, CUDA or the CPU) run the whole
job? In a few minutes, on the tiny test models: train a few LoRA steps, kill -9 the run and
resume it, train QLoRA steps on the 4-bit tiny model, serve a round trip through the worker and
through the Node client, and measure the decode speed and the peak memory. It prints one table,
a PASS/FAIL/SKIP line per check plus the versions: what to paste into a bug report.

    python -m bench.check_backend [--keep] [--json PATH] [--no-build]

Everything it writes goes to a temporary folder (MODELS_DIR/LOGS_DIR point there; removed at the
end unless --keep): your runs in models/ are never touched. The tiny models are built in
models/ when missing (`make tiny-model`; --no-build: never). Exit status 0 when no line
failed, 1 otherwise.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.backend.job import Job, Skip
from bench.backend.serve_checks import check_decode, check_memory, check_node, check_worker
from bench.backend.train_checks import (
    check_data,
    check_lora_killed,
    check_lora_resume,
    check_qlora,
    check_tiny_4bit,
    check_tiny_model,
)
from bench.backend.versions import versions


@dataclass
class Line:
    check: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float


@dataclass
class Report:
    versions: dict
    lines: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)

    def run(self, name, fn, *args):
        """One table line: fn returns its detail (PASS), raises Skip (SKIP) or anything else (FAIL)."""
        t0 = time.monotonic()
        try:
            status, detail = "PASS", fn(*args)
        except Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
        self.lines.append(Line(name, status, detail, round(time.monotonic() - t0, 1)))
        print(
            f"check-backend: {status} {name}: {detail.splitlines()[0] if detail else ''}",
            file=sys.stderr,
            flush=True,
        )
        return status == "PASS"

    @property
    def failed(self):
        return [line for line in self.lines if line.status == "FAIL"]


# --------------------------------------------------------------------------- the table


def table(report):
    v = report.versions
    out = ["farense-lm check-backend (paste all of this into a bug report)", ""]
    out += [f"  {k:<13}{v[k]}" for k in v]
    out.append("")
    width = max(len(line.check) for line in report.lines)
    out.append(f"  {'check':<{width}}  result  time    detail")
    for line in report.lines:
        detail = line.detail.replace("\n", " | ")
        out.append(f"  {line.check:<{width}}  {line.status:<6}  {line.seconds:>5.1f}s  {detail}")
    counts = {s: sum(1 for line in report.lines if line.status == s) for s in ("PASS", "FAIL", "SKIP")}
    out += ["", f"  {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"]
    return "\n".join(out)


def check_all(work, build=True):
    report = Report(versions=versions())
    job = Job(work)
    report.run("tiny model", check_tiny_model, build)
    report.run("tiny model, 4-bit", check_tiny_4bit, build)
    data_ok = report.run("prepare data", check_data, job)
    if data_ok and report.run("train LoRA, kill -9", check_lora_killed, job, report):
        report.run("resume after kill -9", check_lora_resume, job, report)
    else:
        report.lines.append(Line("resume after kill -9", "SKIP", "no killed run to resume", 0.0))
    if data_ok:
        report.run("train QLoRA (4-bit base)", check_qlora, job, report)
    report.run("worker round trip", check_worker, job, report)
    report.run("decode speed", check_decode, report)
    report.run("peak memory", check_memory, report)
    report.run("Node client round trip", check_node, job)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.check_backend", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--no-build", action="store_true", help="never build the tiny models (a missing one fails or skips)"
    )
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="check-backend-")
    try:
        report = check_all(work, build=not args.no_build)
    finally:
        if args.keep:
            print(f"check-backend: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "versions": report.versions,
                    "measured": report.measured,
                    "lines": [asdict(line) for line in report.lines],
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
