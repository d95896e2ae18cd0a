"""Choose this machine's CPU settings by measuring them: the BLAS library, whether its threads
spin or sleep between products, and which decode products core/native/small_gemm.c computes
(Linux CPU only; elsewhere there is nothing to choose).

    python -m core.calibrate              # `make calibrate`: measure, store, print the table
    python -m core.calibrate --if-needed  # `make setup`: only when not done on this CPU yet
    python -m core.calibrate --show       # the stored choice and its table (`make check-backend`)

Each candidate (a library present x a thread policy) runs core/calibrate_work.py in its own
child process, the candidates in turn (the order reversed every other round), ROUNDS rounds
(fewer, but at least 2, when the next would end past BUDGET_S): decoding (1 and 8 streams; each
item once per small_gemm row range, switched within the child) and a LoRA training step, on
the model shapes we ship (calibrate_work.SHAPES). Per role (decode: the worker; train:
training) an option's score is the geometric mean, over that role's items, of the median of its
paired ratios to the default (a round's rate over the default's rate in the same round). The
default stays unless an option scores above 1 + MARGIN, so that on a noisy machine the choice
falls back to the default rather than to chance.

The record goes to .venv/blas-calibration.json with this CPU's identity; core/blas.py applies
the process's role's choice when it loads (a copy of .venv on another CPU is ignored until
recalibrated), and variables set by hand (FAST_BLAS_LIB, FAST_BLAS_POLICY, KMP_BLOCKTIME,
OPENBLAS_THREAD_TIMEOUT, SMALL_GEMM...) still win. docs/PERFORMANCE.md: "CPU settings by
measurement".
"""

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import time

from core import atomic, blas
from core.calibrate_work import KERNEL_MODES

ROUNDS = 3
BUDGET_S = 60  # no round is started that would end later than this (at least 2 rounds)
MARGIN = 0.05  # an alternative must beat the default by more than this in a role's score
TOKENS = 8  # decode steps per item, mode and round
TIMEOUT_S = 300  # one child process
# the items timed (calibrate_work.SHAPES): one stream of the bench shape (M=1 products, the
# kernel's dot products), 8 streams (its interleaved ones), a training step (large products).
# The tiny model is left out (its products are too small for any choice to matter); SmolLM2-135M's
# one stream too: it ranked the 12 options as the bench shape's one stream did (2026-12-05, quiet
# 2-core Xeon, docs/PERFORMANCE.md) and made two rounds take 68 s, over BUDGET_S.
# --decode/--train time others, e.g. decode:smollm2:1,decode:smollm2:16,train:smollm2.
ROLES = {"decode": ["decode:bench:1", "decode:bench:8"], "train": ["train:bench"]}
DEFAULT_MODE = "all"  # what a process does with the kernel and no calibration
MODE_SETTINGS = {
    "off": {"SMALL_GEMM": "0"},
    "all": {"SMALL_GEMM": "1", "SMALL_GEMM_MIN_M": "1"},
    "from4": {"SMALL_GEMM": "1", "SMALL_GEMM_MIN_M": "4"},
}
CONTROLLED = (
    "FAST_BLAS",
    "FAST_BLAS_LIB",
    "FAST_BLAS_POLICY",
    "FAST_BLAS_ROLE",
    blas.AUTO_KEYS,
    *blas.KERNEL_KEYS,
)
CONTROLLED += tuple({k for p in blas.POLICIES.values() for k in p} | set(blas.ALWAYS))


def libraries():
    """{"mkl" | "openblas": path} of the BLAS libraries present, in core.blas's order."""
    found = {}
    for path in blas.CANDIDATES:
        kind = "mkl" if "mkl" in path else "openblas"
        if kind not in found and os.path.isabs(path) and os.path.exists(path):
            found[kind] = path
    return found


def candidates(libs=None):
    """[(name, settings)], the default first: what core.blas does with no calibration."""
    libs = libraries() if libs is None else libs
    policies = [blas.DEFAULT_POLICY, *(p for p in blas.POLICIES if p != blas.DEFAULT_POLICY)]
    return [
        (f"{kind} {p}", {"FAST_BLAS_LIB": path, "FAST_BLAS_POLICY": p})
        for kind, path in libs.items()
        for p in policies
    ]


def kernel_modes():
    """The small_gemm row ranges to try: none where the kernel is not built or is turned off by
    hand (a SMALL_GEMM=0 that core.blas set from the stored choice does not count: measuring again
    after a "kernel off" choice must try the kernel again)."""
    automatic = set(filter(None, os.environ.get(blas.AUTO_KEYS, "").split(",")))
    value = os.environ.get("SMALL_GEMM", "1")
    if f"SMALL_GEMM={value}" not in automatic and value.lower() in ("0", "off", "false", "no"):
        return []
    try:
        lib = ctypes.CDLL(blas.SMALL_GEMM_PATH, mode=os.RTLD_LOCAL)
    except OSError:
        return []  # not built (no C compiler at `make setup`, or not Linux)
    return list(KERNEL_MODES) if hasattr(lib, "small_gemm_set_range") else []  # an old build: none


def child_env(settings, base=None):
    """The environment of one candidate's child: the caller's, less what calibration controls."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in CONTROLLED}
    return {**env, "FAST_BLAS_QUIET": "1", "FAST_BLAS_CALIBRATION": "0", **settings}


def run_child(settings, work, tokens, modes):
    """{"loaded": ..., "rates": {...}} from one child process; RuntimeError naming the candidate,
    also when the child did not load what its settings say."""
    cmd = [sys.executable, "-m", "core.calibrate_work", "--work", ",".join(work), "--tokens", str(tokens)]
    settings = {**settings, "SMALL_GEMM": "1" if modes else "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        cmd + (["--kernel-modes", ",".join(modes)] if modes else []),
        cwd=root,
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"calibration child {settings}: exit {done.returncode}: {done.stderr.strip()[-400:]}"
        )
    res = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = mismatches(settings, res["loaded"])
    if wrong:
        raise RuntimeError(f"calibration child {settings} did not load what it was told: {'; '.join(wrong)}")
    return res


def mismatches(settings, loaded):
    """How a process's loaded state (core.blas.loaded_state()) differs from the settings it was
    started with (FAST_BLAS_LIB, FAST_BLAS_POLICY or the variables, SMALL_GEMM and its row
    range); [] when it loaded what they say."""
    wrong = []
    lib = settings.get("FAST_BLAS_LIB")
    if lib and os.path.realpath(loaded.get("blas") or "") != os.path.realpath(lib):
        wrong.append(f"BLAS {loaded.get('blas')} instead of {lib}")
    policy = blas.POLICIES.get(settings.get("FAST_BLAS_POLICY", ""), {})
    told = {k: settings.get(k, policy.get(k)) for k in ("KMP_BLOCKTIME", "OPENBLAS_THREAD_TIMEOUT")}
    block = loaded.get("kmp_blocktime")
    if block is not None and told["KMP_BLOCKTIME"] is not None and block != int(told["KMP_BLOCKTIME"]):
        wrong.append(f"Intel OpenMP block time {block} instead of {told['KMP_BLOCKTIME']}")
    timeout = loaded.get("openblas_thread_timeout")
    if timeout is not None and told["OPENBLAS_THREAD_TIMEOUT"] not in (None, timeout):
        wrong.append(f"OPENBLAS_THREAD_TIMEOUT {timeout} instead of {told['OPENBLAS_THREAD_TIMEOUT']}")
    if "SMALL_GEMM" in settings and loaded.get("small_gemm") != (settings["SMALL_GEMM"] != "0"):
        wrong.append(
            f"small_gemm {'on' if loaded.get('small_gemm') else 'off'} with SMALL_GEMM={settings['SMALL_GEMM']}"
        )
    lib = settings.get("SMALL_GEMM_LIB")
    if (
        lib
        and loaded.get("small_gemm")
        and os.path.realpath(loaded.get("small_gemm_lib") or "") != os.path.realpath(lib)
    ):
        wrong.append(f"small_gemm from {loaded.get('small_gemm_lib')} instead of {lib}")
    rows = loaded.get("small_gemm_rows")
    if rows and "SMALL_GEMM_MIN_M" in settings and rows[0] != int(settings["SMALL_GEMM_MIN_M"]):
        wrong.append(f"small_gemm from M={rows[0]} instead of {settings['SMALL_GEMM_MIN_M']}")
    return wrong


def measure(cands, roles=ROLES, rounds=ROUNDS, tokens=TOKENS, modes=(), budget_s=BUDGET_S, log=print):
    """{name: {"settings", "loaded", "rates": {key: [one per round]}}}: a decode item's key is
    "item|mode" for each kernel mode. Stops early (after 2 rounds at least) within budget_s."""
    work = [w for items in roles.values() for w in items]
    out = {name: {"settings": s, "loaded": None, "rates": {}} for name, s in cands}
    started = time.monotonic()
    for r in range(rounds):
        for name, settings in cands if r % 2 == 0 else cands[::-1]:  # neither goes first every round
            res = run_child(settings, work, tokens, modes)
            out[name]["loaded"] = res["loaded"]
            for key, rate in res["rates"].items():
                out[name]["rates"].setdefault(key, []).append(rate)
        spent = time.monotonic() - started
        log(f"calibrate: round {r + 1}/{rounds} done, {spent:.0f} s (load {load():.1f})")
        if r + 1 >= 2 and r + 1 < rounds and spent / (r + 1) * (r + 2) > budget_s:
            log(f"calibrate: stopping after {r + 1} rounds: another would end past {budget_s} s")
            break
    return out


def paired(xs, ys):
    return statistics.median(x / y for x, y in zip(xs, ys))


def options(results, role, items):
    """[(option name, candidate name, kernel mode or None)] for a role, the default first."""
    modes = sorted({k.split("|")[1] for k in results[next(iter(results))]["rates"] if "|" in k})
    if role != "decode" or not modes:
        return [(name, name, None) for name in results]
    modes = [DEFAULT_MODE, *(m for m in modes if m != DEFAULT_MODE)] if DEFAULT_MODE in modes else modes
    return [(f"{name}, kernel {m}", name, m) for name in results for m in modes]


def decide(results, roles=ROLES, margin=MARGIN, base=None):
    """{role: {"choice": option, "settings": {...}, "scores": {option: score}}}: the default (the
    first candidate, kernel as by default; or the option named `base`) unless another option
    scores above 1 + margin."""
    out = {}
    for role, items in roles.items():
        opts = options(results, role, items)
        first = (base or {}).get(role) or opts[0][0]
        opts.sort(key=lambda o: o[0] != first)  # the base first
        _, ref, ref_mode = opts[0]

        def key(item, mode):
            return f"{item}|{mode}" if mode else item

        scores = {}
        for option, name, mode in opts:
            ratios = [
                paired(results[name]["rates"][key(w, mode)], results[ref]["rates"][key(w, ref_mode)])
                for w in items
            ]
            scores[option] = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        best = max(scores, key=scores.get)
        choice = best if scores[best] > 1 + margin else opts[0][0]
        _, name, mode = next(o for o in opts if o[0] == choice)
        out[role] = {
            "choice": choice,
            "settings": {**results[name]["settings"], **MODE_SETTINGS.get(mode, {})},
            "scores": scores,
        }
    return out


def option_of(settings, results, role):
    """The option name (as options() makes it) of the candidate and kernel mode that `settings`
    (a stored choice, or the defaults) select among measured `results`; None when none does."""
    lib, policy = settings.get("FAST_BLAS_LIB"), settings.get("FAST_BLAS_POLICY", blas.DEFAULT_POLICY)
    small = settings.get("SMALL_GEMM", "1") != "0"
    mode = "off" if not small else "from4" if settings.get("SMALL_GEMM_MIN_M") == "4" else "all"
    for option, name, m in options(results, role, []):
        s = results[name]["settings"]
        same_lib = lib is None or os.path.realpath(s.get("FAST_BLAS_LIB", "")) == os.path.realpath(lib)
        if same_lib and s.get("FAST_BLAS_POLICY") == policy and m in (None, mode):
            return option
    return None


def current_settings(role="decode"):
    """What a process of `role` starts with now: the stored choice, or the defaults (the first
    library present, DEFAULT_POLICY, the kernel for every M)."""
    stored = blas.read_calibration()
    if stored and os.environ.get("FAST_BLAS_CALIBRATION", "1") != "0":
        return stored["choice"][role]
    libs = libraries()
    return {"FAST_BLAS_LIB": next(iter(libs.values()), None), "FAST_BLAS_POLICY": blas.DEFAULT_POLICY}


def table(record):
    """The measured table as text lines: each item's median rate per candidate, then the scores."""
    names = list(record["results"])
    width = max(12, *(len(n) + 2 for n in names))
    keys = list(record["results"][names[0]]["rates"])
    label = max(24, *(len(k) + 7 for k in keys))
    lines = [f"{'tokens/s (median)':<{label}}" + "".join(f"{n:>{width}}" for n in names)]
    for key in keys:
        cells = "".join(f"{statistics.median(record['results'][n]['rates'][key]):>{width}.1f}" for n in names)
        lines.append(f"{key.replace('|', ' kernel '):<{label}}{cells}")
    for role, d in record["decision"].items():
        for option, score in d["scores"].items():
            mark = "  <- chosen" if option == d["choice"] else ""
            lines.append(f"{role} score  {option:<34} {score:5.2f}x{mark}")
    return lines


def children_cpu():
    import resource

    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def load():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def calibrate(
    rounds=ROUNDS, tokens=TOKENS, log=print, cands=None, store=True, roles=ROLES, budget_s=BUDGET_S
):
    """Measure, decide, store; returns the record (None where there is nothing to choose)."""
    cands = candidates() if cands is None else cands
    if not sys.platform.startswith("linux") or not cands:
        log("calibrate: nothing to choose here (not Linux, or no BLAS library present)")
        return None
    modes = kernel_modes()
    started, load0, cpu0 = time.time(), load(), children_cpu()
    log(
        f"calibrate: {len(cands)} candidates x {rounds} rounds, kernel modes {modes or 'none'} (load {load0:.1f})"
    )
    results = measure(cands, roles, rounds, tokens, modes, budget_s, log)
    record = {
        "cpu": blas.cpu_identity(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1),
        "cpu_seconds": round(children_cpu() - cpu0, 1),  # the children's: what the work costs, load aside
        "load": [round(load0, 2), round(load(), 2)],
        "rounds": len(next(iter(next(iter(results.values()))["rates"].values()))),
        "margin": MARGIN,
        "decision": decide(results, roles),
        "results": results,
    }
    record["choice"] = {role: d["settings"] for role, d in record["decision"].items()}
    if store:
        atomic.write_text(blas.CALIBRATION_PATH, json.dumps(record, indent=1) + "\n")
    for line in table(record):
        log(line)
    log(
        f"calibrate: {'stored in ' + blas.CALIBRATION_PATH if store else 'not stored'} ({record['seconds']} s;"
        f" the children's CPU time {record['cpu_seconds']} s)"
    )
    return record


def describe(stored):
    """Lines for `make check-backend` and --show."""
    if stored is None:
        return [
            f"calibration: none for this CPU in {blas.CALIBRATION_PATH}: defaults in use (`make calibrate`)"
        ]
    head = f"calibration: {stored['when']}, {stored['rounds']} rounds, load {stored['load'][0]}-{stored['load'][1]}"
    chosen = [f"  {role}: {d['choice']}" for role, d in stored["decision"].items()]
    return [head, *chosen, *table(stored)]


def parse_candidate(text):
    """'NAME:K=V,K=V' -> (NAME, {K: V}); ValueError naming the bad part."""
    name, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"candidate {text!r}: {item!r} is not NAME=VALUE")
        settings[key] = value
    if not name:
        raise ValueError(f"candidate {text!r}: no name before ':'")
    return name, settings


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m core.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--if-needed", action="store_true", help="only when not yet calibrated on this CPU")
    p.add_argument("--show", action="store_true", help="print the stored choice and table")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds (at least 2 rounds are run)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="decode steps per item, mode and round")
    p.add_argument("--candidate", action="append", help="NAME:K=V,K=V (repeatable; the first is the default)")
    p.add_argument("--decode", help=f"decode items, comma-separated (default {','.join(ROLES['decode'])})")
    p.add_argument("--train", help=f"train items (default {','.join(ROLES['train'])})")
    p.add_argument(
        "--store", action="store_true", help="store the choice even with --candidate/--decode/--train"
    )
    p.add_argument("--json", help="also write the whole record to this file")
    args = p.parse_args(argv)
    try:
        cands = [parse_candidate(c) for c in args.candidate] if args.candidate else None
    except ValueError as e:
        p.error(str(e))
    if args.show:
        print("\n".join(describe(blas.read_calibration())))
        return 0
    stored = blas.read_calibration()
    if args.if_needed and stored is not None:
        print(f"calibrate: already done on this CPU ({stored['when']}); `make calibrate` runs it again")
        return 0
    roles = {
        "decode": (args.decode or ",".join(ROLES["decode"])).split(","),
        "train": (args.train or ",".join(ROLES["train"])).split(","),
    }
    store = args.store or (cands is None and roles == ROLES)
    record = calibrate(args.rounds, args.tokens, cands=cands, store=store, roles=roles, budget_s=args.budget)
    if args.json and record:
        atomic.write_text(args.json, json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
