"""Pipelined decode under different environments, in alternating child processes:

    python -m bench.decode_env SMALL_GEMM_SPIN_US=0 SMALL_GEMM_SPIN_US=100 [--rounds 6] [--tokens 160]

Each argument is one variant: space-separated NAME=VALUE settings (read when the libraries
load, so each run is its own process). Per round every variant runs once, in turn: greedy
`mlx_lm.stream_generate` of `--tokens` tokens after a 100-token prompt, on the bench model
(`bench.anchors.stream_generate_once`, timed as `make bench` times it). Prints each variant's
median tokens/s and the median of its paired ratios to the first variant. For knobs such as
SMALL_GEMM_SPIN_US, SMALL_GEMM_THREADS or SMALL_GEMM=0 that one process cannot switch. Each
child reports what its libraries really loaded (core.blas.loaded_state()) and a variant whose
child did not load what its settings say (FAST_BLAS_LIB, FAST_BLAS_POLICY, KMP_BLOCKTIME,
OPENBLAS_THREAD_TIMEOUT, SMALL_GEMM, SMALL_GEMM_MIN_M, SMALL_GEMM_LIB) stops the run.
"""

import argparse
import json
import os
import subprocess
import sys

from bench import report
from core import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_IDS = list(range(3, 103))  # 100 tokens, no tokenizer needed


def child(model_dir, tokens):
    """The decode rate of one run, printed as its last line."""
    from mlx_lm import load

    from bench.anchors import stream_generate_once

    # the default device, as `make bench` decodes (Metal on a Mac; SMALL_GEMM_* act on the CPU only)
    from core import blas

    model, tokenizer = load(model_dir)
    stream_generate_once(model, tokenizer, PROMPT_IDS, 8)  # warm
    rate = stream_generate_once(model, tokenizer, PROMPT_IDS, tokens)["tokens_per_s"]
    print(json.dumps({"tokens_per_s": rate, "loaded": blas.loaded_state()}))


def parse_variant(text):
    """ "A=1 B=2" -> {"A": "1", "B": "2"}; ValueError naming the bad setting."""
    settings = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"variant {text!r}: {item!r} is not NAME=VALUE")
        settings[name] = value
    return settings


def run_once(settings, model_dir, tokens):
    cmd = [sys.executable, "-m", "bench.decode_env", "--child", "--model", model_dir, "--tokens", str(tokens)]
    env = {**os.environ, "FAST_BLAS_QUIET": "1", **settings}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"{settings}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = calibrate.mismatches(settings, res["loaded"])
    if wrong:  # a variant that did not take effect would compare a setting with itself
        raise RuntimeError(f"{settings}: the child did not load what they say: {'; '.join(wrong)}")
    return float(res["tokens_per_s"])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.decode_env", description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="*", help='e.g. "SMALL_GEMM_SPIN_US=0" "SMALL_GEMM_SPIN_US=100"')
    p.add_argument("--model", default="models/bench-mistral")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=160)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.model, args.tokens)
        return 0
    if len(args.variants) < 2:
        p.error("give at least two variants to compare")
    try:
        variants = [parse_variant(v) for v in args.variants]
    except ValueError as e:
        p.error(str(e))
    rates = [[] for _ in variants]
    for r in range(args.rounds):
        for i, settings in enumerate(variants):
            rates[i].append(run_once(settings, args.model, args.tokens))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{x[-1]:.1f}" for x in rates), flush=True)
    for text, x in zip(args.variants, rates):
        paired = report.paired_ratio(x, rates[0])
        print(
            f"{text:<40} median {report.median(x):6.1f} tok/s   vs first {paired:.2f}x   {[round(v, 1) for v in x]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
