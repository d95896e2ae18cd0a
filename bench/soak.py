"""`make soak`: long chatbot-shaped traffic through the real worker; memory, lost and
duplicated replies, errors, latency, and a plot of resident memory against requests.

    python -m bench.soak --requests 20000 --budget 64MiB --baseline [--via stdio|http]

The traffic (`plan`, deterministic for a seed): one shared system prompt (the club's), varied
questions (some repeated, some follow-ups of an earlier answer), 1-24 tokens each, half of
them streamed, some sampled with a seed; about 10% cancelled (at once, or after a few
streamed tokens) and about 3% garbage lines. Through the worker's stdio (bench/soak_driver.py,
at most --concurrency requests outstanding, as a parent keeps it) or through the Express
example over HTTP (examples/express/bench/soak.js: SSE, the client disconnecting instead of
cancelling, garbage bodies).

Memory is the worker's `stats.memory.resident_bytes` (the RSS on the CPU backend; RSS plus
mlx's buffers on Metal and CUDA, docs/PROTOCOL.md), asked for every --stats-every requests.
With --baseline the same traffic also runs with --prefix-cache-bytes 0 (at the same time,
unless --sequential), and the budget is judged (`judge`): with a budget B the resident memory
stays within the baseline's end + 1.1 B, and over the second half of the run it grows less
than 2%. Writes bench/results/soak-<date>-<host>-<budget>.json and .png.
"""

import argparse
import json
import random
import socket
import statistics
import sys
import threading
from datetime import datetime
from pathlib import Path

from bench import soak_driver

ROOT = soak_driver.ROOT
RESULTS = ROOT / "bench" / "results"
SLACK = 1.10  # resident memory <= baseline + SLACK x budget
MAX_GROWTH = 0.02  # over the second half of the run

SYSTEM = (
    "És o assistente virtual do Sporting Clube Farense, o clube de futebol de Faro, fundado a "
    "1 de abril de 1910. Respondes em português europeu, com frases curtas, simpáticas e "
    "verificáveis, sobre o clube, a sua história, o Estádio de São Luís, os jogos, os bilhetes, "
    "as quotas de sócio, a loja e as escolas de futebol. Se não souberes a resposta, dizes que "
    "não sabes e indicas o site oficial ou a secretaria do clube."
)
TOPICS = [
    "o Estádio de São Luís",
    "os bilhetes para o próximo jogo",
    "as quotas de sócio",
    "a loja oficial",
    "as escolas de futebol",
    "a história do clube",
    "o treinador",
    "os adeptos",
    "as cores do clube",
    "a mascote",
    "a equipa feminina",
    "o calendário da época",
    "a subida de divisão",
    "o clássico do Algarve",
    "o museu do clube",
]
ASKS = [
    "Fala-me sobre {t}.",
    "O que sabes sobre {t}?",
    "Tenho uma dúvida sobre {t}: podes ajudar?",
    "Onde encontro informação sobre {t}?",
    "Quando é que há novidades sobre {t}?",
    "Explica-me {t} em duas frases.",
]
GARBAGE = [
    "{not json",
    '{"id": "g", "prompt": ',
    '{"op": "nope"}',
    '{"prompt": "no id"}',
    "[1, 2, 3]",
    '{"id": 7, "prompt": "x"}',
    "[" * 100 + "]" * 100,
]


def plan(n, seed=0, cancel=0.10, garbage=0.03):
    """n requests (dicts) and garbage lines ({"garbage": text}), in order, deterministic."""
    rnd = random.Random(seed)
    items, seen = [], []
    for i in range(n):
        r = rnd.random()
        if seen and r < 0.10:  # the same question again: an exact prefix-cache hit
            question = rnd.choice(seen[-50:])
        else:
            question = rnd.choice(ASKS).format(t=rnd.choice(TOPICS))
            if rnd.random() < 0.7:
                question += f" (pergunta {rnd.randrange(10**6)})"  # never seen before
            seen.append(question)
        messages = [{"role": "system", "content": SYSTEM}]
        if rnd.random() < 0.2:  # a follow-up: the earlier turn is a prefix already served
            earlier = rnd.choice(ASKS).format(t=rnd.choice(TOPICS))
            messages += [
                {"role": "user", "content": earlier},
                {"role": "assistant", "content": "O Farense responde a isso no site oficial."},
            ]
        messages.append({"role": "user", "content": question})
        req = {"id": f"q{i}", "messages": messages, "max_tokens": rnd.randint(1, 24)}
        req["stream"] = rnd.random() < 0.5
        if rnd.random() < 0.3:
            req.update(temperature=0.8, seed=rnd.randrange(1 << 31))
        if rnd.random() < cancel:
            # streamed: cancelled after a few tokens (it may finish first); else at once
            req["cancel_after"] = rnd.randint(1, 4) if req["stream"] else 0
        items.append(req)
        if rnd.random() < garbage:
            items.append({"garbage": rnd.choice(GARBAGE)})
    return items


def parse_bytes(text):
    """'67108864', '64MiB', '64M', '1GiB', '0' -> bytes."""
    t = str(text).strip().lower().removesuffix("b").removesuffix("i")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _median(xs):
    return statistics.median(xs) if xs else 0


def checkpoints(samples, requests, count=20):
    """The run cut into `count` windows of answered requests: the median and highest resident
    memory in each (single samples swing with the batch), and the cache's counted bytes.
    Samples taken idle, after the last answer, are left out."""
    samples = [s for s in samples if not s.get("idle")]
    out = []
    for k in range(1, count + 1):
        lo, hi = requests * (k - 1) / count, requests * k / count
        window = [s for s in samples if lo < s["answered"] <= hi] or [
            s for s in samples if s["answered"] <= hi
        ][-1:]
        if not window:
            continue
        out.append(
            {
                "requests": int(hi),
                "resident_mib": round(_median([s["resident"] for s in window]) / 2**20, 1),
                "resident_max_mib": round(max(s["resident"] for s in window) / 2**20, 1),
                "counted_mib": round(window[-1]["counted"] / 2**20, 1),
                "entries": window[-1]["entries"],
                "active_mib": round(window[-1]["active"] / 2**20, 1),
                "mlx_cache_mib": round(window[-1]["cache"] / 2**20, 1),
            }
        )
    return out


def _tail_median(samples, lo, hi):
    """Median resident bytes of the samples between fractions lo and hi of the run."""
    samples = [s for s in samples if not s.get("idle")]
    n = max((s["answered"] for s in samples), default=0)
    window = [s["resident"] for s in samples if lo * n <= s["answered"] <= hi * n]
    return _median(window)


def judge(result, baseline=None):
    """The budget's two rules (module doc). `baseline`: the same traffic with budget 0."""
    samples, budget = result["samples"], result["budget"]
    mid, end = _tail_median(samples, 0.45, 0.55), _tail_median(samples, 0.9, 1.0)
    verdict = {
        "resident_mid_mib": round(mid / 2**20, 1),
        "resident_end_mib": round(end / 2**20, 1),
        "growth_second_half_pct": round(100 * (end - mid) / mid, 2) if mid else None,
        "growth_ok": bool(mid) and (end - mid) / mid < MAX_GROWTH,
    }
    if baseline is not None:
        base_end = _tail_median(baseline["samples"], 0.9, 1.0)
        bound = base_end + SLACK * budget
        highest = max((c["resident_mib"] for c in checkpoints(samples, result["requests"])), default=0)
        verdict.update(
            baseline_end_mib=round(base_end / 2**20, 1),
            bound_mib=round(bound / 2**20, 1),
            highest_checkpoint_mib=highest,
            above_baseline_mib=round(highest - base_end / 2**20, 1),
            bound_ok=highest * 2**20 <= bound,
        )
    return verdict


def problems(result):
    """What must never happen, as sentences (empty: none)."""
    out = []
    for key, what in (
        ("lost", "requests without a terminal message"),
        ("duplicated", "requests with more than one terminal message"),
        ("late_tokens", "tokens after a terminal message"),
    ):
        if result.get(key):
            out.append(f"{result[key]} {what}")
    if result.get("errors"):
        out.append(f"errors for valid requests: {result['errors']}")
    if result.get("garbage_errors") != result.get("garbage_sent"):
        out.append(f"{result.get('garbage_errors')} errors for {result.get('garbage_sent')} garbage lines")
    if result.get("exit_code") not in (0, None):
        out.append(f"the worker exited with {result['exit_code']}")
    return out


def run_pair(args, items, runner):
    """The budgeted run and, with --baseline, the 0-budget one (in parallel by default)."""
    budgets = [args.budget] + ([0] if args.baseline and args.budget else [])
    results = {}

    def one(budget):
        results[budget] = runner(items, budget, args)

    if args.sequential or len(budgets) == 1:
        for b in budgets:
            one(b)
    else:
        threads = [threading.Thread(target=one, args=(b,)) for b in budgets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    missing = [b for b in budgets if b not in results]
    if missing:
        raise SystemExit(f"soak: the run with budget {missing[0]} failed (see above)")
    return results[args.budget], results.get(0) if len(budgets) > 1 else None


def report(result, baseline, verdict):
    lines = []
    for r in [result] + ([baseline] if baseline else []):
        lines.append(
            f"\n{r['via']} budget {r['budget']:,} B: {r['requests']:,} requests in {r['seconds']:.0f} s "
            f"(backend {r['backend']}, memory = {r['resident_source']})"
        )
        lines.append(
            "  requests  resident MiB (median/max)  cache counted MiB  entries  mlx active/cache MiB"
        )
        for c in checkpoints(r["samples"], r["requests"]):
            lines.append(
                f"  {c['requests']:>8,}  {c['resident_mib']:>10.1f} / {c['resident_max_mib']:<10.1f}"
                f"  {c['counted_mib']:>16.1f}  {c['entries']:>7}  {c['active_mib']:>8.1f} / {c['mlx_cache_mib']:.1f}"
            )
        lat = r["latency_ms"]
        lines.append(
            f"  lost {r['lost']}, duplicated {r['duplicated']}, late tokens {r['late_tokens']}, "
            f"errors {r['errors'] or 0}, garbage {r['garbage_sent']} -> {r['garbage_errors']} errors, "
            f"cancels {r['cancel_sent']} ({r['cancelled']} cancelled), "
            f"latency p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms (client side)"
        )
        for p in problems(r):
            lines.append(f"  PROBLEM: {p}")
    v = verdict
    growth = v["growth_second_half_pct"]
    lines.append(
        f"\nsecond half: {v['resident_mid_mib']} -> {v['resident_end_mib']} MiB "
        + (f"({growth:+}%, " if growth is not None else "(too few samples, ")
        + f"limit +{MAX_GROWTH:.0%}: {'ok' if v['growth_ok'] else 'GROWING'})"
    )
    if "bound_mib" in v:
        lines.append(
            f"budget: highest checkpoint {v['highest_checkpoint_mib']} MiB, baseline end {v['baseline_end_mib']} MiB "
            f"+ {SLACK} x {result['budget'] / 2**20:.1f} MiB = {v['bound_mib']} MiB: "
            f"{'within' if v['bound_ok'] else 'ABOVE'} ({v['above_baseline_mib']:+} MiB over the baseline)"
        )
    return "\n".join(lines)


def plot(result, baseline, verdict, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for r, color in ((result, "tab:blue"), (baseline, "tab:gray")):
        if r is None:
            continue
        xs = [s["answered"] for s in r["samples"]]
        ax.plot(xs, [s["resident"] / 2**20 for s in r["samples"]], color=color, lw=0.6, alpha=0.5)
        cps = checkpoints(r["samples"], r["requests"])
        label = f"prefix cache {r['budget'] / 2**20:g} MiB" if r["budget"] else "no prefix cache (baseline)"
        ax.plot(
            [c["requests"] for c in cps], [c["resident_mib"] for c in cps], color=color, lw=2, label=label
        )
    if "bound_mib" in verdict:
        ax.axhline(
            verdict["bound_mib"], color="tab:red", ls="--", lw=1, label="bound: baseline end + 1.1 x budget"
        )
        base = verdict["baseline_end_mib"]
        counted = [(s["answered"], base + s["counted"] / 2**20) for s in result["samples"]]
        ax.plot(
            *zip(*counted), color="tab:green", ls=":", lw=1.2, label="baseline end + bytes the cache counts"
        )
    ax.set_xlabel("requests answered")
    ax.set_ylabel(f"worker memory, MiB ({result['resident_source']})")
    ax.set_title(f"Soak: {result['requests']:,} chatbot requests through the worker ({result['via']})")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("-n", "--requests", type=int, default=2000)
    p.add_argument("--budget", type=parse_bytes, default=parse_bytes("64MiB"), help="--prefix-cache-bytes")
    p.add_argument("--baseline", action="store_true", help="also run with budget 0 and judge the budget")
    p.add_argument("--sequential", action="store_true", help="the two runs one after the other")
    p.add_argument("--via", choices=("stdio", "http"), default="stdio")
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-mistral"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stats-every",
        type=int,
        default=None,
        help="requests between two memory samples (default: 25, fewer for short runs: 200 samples at least)",
    )
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker option (repeatable)")
    p.add_argument(
        "--worker-root",
        default=str(ROOT),
        help="run the worker of another checkout (before/after comparisons; stdio only)",
    )
    p.add_argument("--out", help="path of the JSON (default bench/results/soak-<date>-<host>-<budget>.json)")
    p.add_argument("--png", help="path of the plot (default: the JSON's, .png)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.budget < 0 or (args.stats_every or 1) < 1:
        p.error("--requests, --concurrency and --stats-every must be >= 1, --budget >= 0")
    if args.stats_every is None:
        args.stats_every = max(1, min(25, args.requests // 200))
    return args


def main(argv=None):
    args = parse_args(argv)
    runner = soak_driver.run_http if args.via == "http" else soak_driver.run_stdio
    items = plan(args.requests, args.seed)
    result, baseline = run_pair(args, items, runner)
    verdict = judge(result, baseline)
    print(report(result, baseline, verdict), flush=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(args.out or RESULTS / f"soak-{stamp}-{socket.gethostname()}-{args.via}-{args.budget}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = Path(args.png or out.with_suffix(".png"))
    plot(result, baseline, verdict, png)
    doc = {"args": vars(args), "verdict": verdict, "result": result, "baseline": baseline}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} and {png.name}")
    bad = problems(result) + (problems(baseline) if baseline else [])
    if not verdict["growth_ok"] or not verdict.get("bound_ok", True):
        bad.append("memory outside its bound")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
