"""Prefill against its compute limit: the machine's measured sgemm FLOP/s over the model's
prefill FLOPs per prompt token, and an uncached ~1,000-token prompt through the worker.

    python -m bench.prefill [--model models/bench-mistral] [--tokens 1000] [--steps 2048,256,128] [--rounds 3]

With --steps, one worker per prefill chunk size (`--prefill-step-size`), all alive, the same
uncached prompts in interleaved rounds; medians and the median of per-round ratios to the first.
`make bench` section **prefill** (`section`, `rows`): an uncached ~1,000-token prompt through the
worker against the roofline, each rep paired with a roofline pass; target >= 0.5.
"""

import argparse
import json
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import bench  # noqa: F401  (fast BLAS before mlx)
from bench import report
from bench.chat_replay import system_prompt
from bench.common import BENCH, log, rel, sub_env
from bench.worker_client import WorkerProcess

SECTION = "prefill"
PLAN = {
    "quick": dict(prefill_model=BENCH, prefill_tokens=1000, prefill_reps=1),
    "full": dict(prefill_model=BENCH, prefill_tokens=1000, prefill_reps=3),
}


def linear_shapes(config):
    """(out, in) of every matrix a prompt token multiplies (the embedding is a lookup)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads") or config["num_attention_heads"],
    )
    d = config.get("head_dim") or h // heads
    layer = [(heads * d, h), (kv * d, h), (kv * d, h), (h, heads * d), (i, h), (i, h), (h, i)]
    return layer * config["num_hidden_layers"] + [(config["vocab_size"], h)]


def flops_per_token(config, prompt_tokens):
    """Useful FLOPs per prompt token of an n-token prompt: 2 x the linear weights, plus the
    causal attention (QK^T and AV, 2 FLOPs per multiply-add, n/2 positions on average). Only
    the last position needs lm_head, so it is left out."""
    shapes = linear_shapes(config)[:-1]
    heads = config["num_attention_heads"]
    d = config.get("head_dim") or config["hidden_size"] // heads
    attention = 2 * 2 * config["num_hidden_layers"] * heads * d * (prompt_tokens / 2)
    return 2 * sum(o * i for o, i in shapes) + attention


def sgemm_flops(config, rows=256, passes=5):
    """The fastest of several passes of the model's own prefill products (rows x in @ in x out,
    float32, through mlx and the loaded BLAS): FLOP/s this machine's sgemm reaches."""
    import mlx.core as mx

    shapes = sorted(set(linear_shapes(config)[:7]))
    ws = [mx.random.normal((o, i)) for o, i in shapes]
    xs = {i: mx.random.normal((rows, i)) for _, i in shapes}
    mx.eval(ws, list(xs.values()))
    flops = sum(2 * rows * o * i for o, i in shapes)
    best = 0.0
    for _ in range(passes + 1):
        tic = time.perf_counter()
        mx.eval([xs[w.shape[1]] @ w.T for w in ws])
        best = max(best, flops / (time.perf_counter() - tic))
    return best


def roofline(model_dir, prompt_tokens=1000, passes=5):
    config = json.loads((Path(model_dir) / "config.json").read_text())
    f = sgemm_flops(config, passes=passes)
    per_token = flops_per_token(config, prompt_tokens)
    return {
        "sgemm_flops_per_s": f,
        "flops_per_token": per_token,
        "prompt_tokens": prompt_tokens,
        "limit_tokens_per_s": f / per_token,
    }


def long_prompt(tokenizer, n_tokens, nonce):
    """A Portuguese system prompt of about n_tokens tokens that no cache has seen (nonce first)."""
    base = system_prompt()
    text = f"Sessão {nonce}. "
    while len(tokenizer.encode(text, add_special_tokens=False)) < n_tokens:
        text += base + " "
    ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)


def uncached_prefill(w, tokenizer, n_tokens):
    """One uncached prompt of ~n_tokens through the worker, max_tokens 1: prefill tokens/s."""
    system = long_prompt(tokenizer, n_tokens, uuid.uuid4().hex[:12])
    r = w.generate(
        {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Olá"}],
            "max_tokens": 1,
            "temperature": 0,
            "stream": True,
        }
    )
    usage = r.done["usage"]
    ttft = r.client_ttft_s()
    computed = usage["prompt_tokens"] - usage.get("cached_tokens", 0)
    return {
        "client_ttft_ms": ttft * 1000.0,
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": usage.get("cached_tokens", 0),
        "tokens_per_s": computed / ttft,
        "load": os.getloadavg()[0],
    }


def section(ctx):
    """The compute roofline (measured sgemm FLOP/s / the model's prefill FLOPs per token) and
    uncached ~1,000-token prompts through the worker, each rep paired with a roofline pass."""
    plan = ctx.plan
    model_dir, n = plan["prefill_model"], plan["prefill_tokens"]
    w = ctx.workers.main(model_dir)
    tokenizer = ctx.tokenizer(model_dir)
    out = {
        "model": rel(model_dir),
        "prompt_tokens": n,
        "worker_command": shlex.join(w.command),
        "prefill_step_size": (w.ready.get("limits") or {}).get("prefill_step_size"),
        "reps": [],
        "rooflines": [],
    }
    ctx.res[SECTION] = out
    for rep in range(plan["prefill_reps"]):
        roof = roofline(model_dir, n, passes=3)
        r = uncached_prefill(w, tokenizer, n)
        out["rooflines"].append(roof)
        out["reps"].append(r)
        log(
            f"prefill rep {rep + 1}/{plan['prefill_reps']}: {r['prompt_tokens'] - r['cached_tokens']} uncached tokens "
            f"in {r['client_ttft_ms']:.0f} ms = {r['tokens_per_s']:.0f} tok/s; roofline {roof['limit_tokens_per_s']:.0f} "
            f"tok/s ({roof['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s sgemm / {roof['flops_per_token'] / 1e6:.0f} "
            f"MFLOP per token); load {r['load']:.2f}"
        )
    out["tokens_per_s_summary"] = report.summarize([r["tokens_per_s"] for r in out["reps"]])
    out["limit_summary"] = report.summarize([r["limit_tokens_per_s"] for r in out["rooflines"]])
    out["sgemm_summary"] = report.summarize([r["sgemm_flops_per_s"] for r in out["rooflines"]])
    out["flops_per_token"] = out["rooflines"][0]["flops_per_token"] if out["rooflines"] else None


def rows(res):
    pf = res.get(SECTION)
    if not pf or not pf.get("reps"):
        return []
    med = lambda k: report.median_of(pf, k)
    paired = report.median(
        [r["tokens_per_s"] / f["limit_tokens_per_s"] for r, f in zip(pf["reps"], pf["rooflines"])]
    )
    return [
        report.row(
            f"prefill vs compute roofline, uncached {pf['prompt_tokens']}-token prompt",
            med("tokens_per_s_summary"),
            med("limit_summary"),
            "tok/s",
            ours_label=f"worker, chunk {pf.get('prefill_step_size')}",
            anchor_label=f"{report.fmt(med('sgemm_summary') / 1e9)} GFLOP/s / "
            f"{report.fmt(pf['flops_per_token'] / 1e6)} MFLOP",
            target_key="prefill_roofline",
            paired=paired,
            value=paired,
        ),
    ]


def models_note(plan):
    return (
        f"prefill on {rel(plan['prefill_model'])} ({plan['prefill_reps']} reps x {plan['prefill_tokens']} "
        "uncached tokens)"
    )


def main(argv=None):
    from mlx_lm.utils import load_tokenizer

    p = argparse.ArgumentParser(prog="python -m bench.prefill", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BENCH))
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--steps", default="", help="comma-separated prefill chunk sizes to compare (worker flag)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(Path(args.model))
    steps = [int(s) for s in args.steps.split(",") if s.strip()] or [None]
    workers, res = {}, {}
    try:
        for step in steps:
            extra = ["--prefill-step-size", str(step)] if step else []
            workers[step] = WorkerProcess(
                ["--model", args.model, *extra], env=sub_env(FAST_BLAS_QUIET=1)
            ).start()
            workers[step].generate({"prompt": "Olá", "max_tokens": 1})
            res[step] = []
        for rnd in range(args.rounds):
            roof = roofline(args.model, args.tokens, passes=3)
            for step, w in workers.items():
                r = uncached_prefill(w, tokenizer, args.tokens)
                r["limit_tokens_per_s"] = roof["limit_tokens_per_s"]
                res[step].append(r)
                log(
                    f"round {rnd + 1}/{args.rounds} step {step or 'default'}: {r['prompt_tokens']} tokens in "
                    f"{r['client_ttft_ms']:.0f} ms = {r['tokens_per_s']:.0f} tok/s; roofline "
                    f"{roof['limit_tokens_per_s']:.0f} tok/s ({roof['sgemm_flops_per_s'] / 1e9:.0f} GFLOP/s); "
                    f"load {r['load']:.2f}"
                )
    finally:
        for w in workers.values():
            w.close()
    first = res[steps[0]]
    for step, rs in res.items():
        tps = [r["tokens_per_s"] for r in rs]
        vs_roof = report.median([r["tokens_per_s"] / r["limit_tokens_per_s"] for r in rs])
        vs_first = report.paired_ratio(tps, [r["tokens_per_s"] for r in first])
        print(
            f"step {step or 'default'}: median {report.fmt(report.median(tps))} tok/s, "
            f"{report.fmt(vs_roof)} of the roofline (median of paired), {report.fmt(vs_first)}x step {steps[0]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
