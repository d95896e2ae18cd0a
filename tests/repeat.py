"""Run chosen tests N times, each time in a fresh pytest process with its own temporary folder
(session fixtures, trained runs and caches are made again, as on a fresh clone), and count the
runs that failed. For a suspect test: a failure that comes by chance is a defect to find.

    python tests/repeat.py -n 20 tests/test_distributed.py::test_two_processes_of_4_train_like_one_of_8
    python tests/repeat.py -n 5 --grep DIST-COMPARE tests/test_distributed.py -- -m "slow or not slow"

`make test-repeat TESTS=... N=20` runs it. Exit status 1 when any run failed; the last line
reads 'N passed, M failed' (runs, not tests).
"""

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--runs", type=int, default=10, help="how many times (default 10)")
    p.add_argument("--grep", help="print the output lines matching this regular expression, each run")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failed run")
    p.add_argument("tests", nargs="+", help="pytest node ids or files; after --, options for pytest")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.runs < 1:
        p.error("-n must be at least 1")
    args.pytest_args = extra
    return args


def one_run(args, index, basetemp):
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    cmd += ["--basetemp", str(basetemp / f"run{index}"), *args.pytest_args, *args.tests]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    summary = next(
        (line for line in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", line)), ""
    )
    return proc.returncode, out, summary.strip("= "), time.monotonic() - start


def main(argv=None):
    args = parse_args(argv)
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="repeat-") as tmp:
        for i in range(1, args.runs + 1):
            code, out, summary, seconds = one_run(args, i, Path(tmp))
            ok = code == 0
            passed, failed = passed + ok, failed + (not ok)
            print(
                f"run {i}/{args.runs}: {'ok' if ok else f'FAILED (exit {code})'}: {summary} ({seconds:.0f} s)"
            )
            if args.grep:
                for line in out.splitlines():
                    if re.search(args.grep, line):
                        print(f"  {line.strip()}")
            if not ok:
                print("\n".join("  | " + line for line in out.splitlines()[-60:]))
                if not args.keep_going:
                    break
            sys.stdout.flush()
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
