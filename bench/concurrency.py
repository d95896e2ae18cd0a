"""`make bench` section **concurrency** (the full run; the quick run's workload covers it):
N requests in one stdin write to the worker vs N threads of urllib on `mlx_lm server`,
non-streaming, temperature 0, the same max_tokens; aggregate tokens/s = completion tokens /
(last answer - send), at each level, the sides alternating; the plot against concurrency."""

import http.client
import os
import shlex
import threading
import time
import urllib.error
from pathlib import Path

from bench import report
from bench.anchors import SERVER_ATTEMPTS, ServerProcess
from bench.common import BENCH, log, rel, sub_env

SECTION = "concurrency"
PLAN = {
    "quick": dict(conc_model=BENCH, conc_levels=[1, 8], conc_reps=2, conc_max_tokens=16),
    "full": dict(conc_model=BENCH, conc_levels=[1, 2, 4, 8, 16], conc_reps=3, conc_max_tokens=48),
}


def messages(tag, i):
    return [{"role": "user", "content": f"Pergunta {tag}-{i}: o que sabes sobre a história do Farense?"}]


def worker_once(w, n, max_tokens, tag):
    reqs = [{"messages": messages(tag, i), "max_tokens": max_tokens, "temperature": 0} for i in range(n)]
    results = w.generate_many(reqs)
    t0 = results[0].t_sent
    wall = max(r.t_done for r in results) - t0
    toks = sum(r.completion_tokens for r in results)
    return {
        "n": n,
        "aggregate_tokens_per_s": toks / wall,
        "wall_s": wall,
        "completion_tokens": toks,
        "per_request_tokens": [r.completion_tokens for r in results],
    }


def server_once(s, n, max_tokens, tag):
    out = [None] * n
    barrier = threading.Barrier(n + 1)
    retries = [0] * n

    def one(i):
        barrier.wait()
        for attempt in range(SERVER_ATTEMPTS):
            try:
                usage, _ = s.chat(messages(tag, i), max_tokens)
                out[i] = (usage.get("completion_tokens", 0), time.perf_counter(), None)
                return
            except (ConnectionError, http.client.RemoteDisconnected, urllib.error.URLError) as e:
                # http.server's listen backlog is 5: a burst of connections can be reset.
                # Retry as a client would; the time lost counts against the server.
                out[i] = (0, time.perf_counter(), f"{type(e).__name__}: {e}")
                retries[i] += 1
                time.sleep(0.05 * (attempt + 1))
            except Exception as e:
                out[i] = (0, time.perf_counter(), f"{type(e).__name__}: {e}")
                return

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    errors = [o[2] for o in out if o[2]]
    if errors:
        raise RuntimeError(f"mlx_lm server errors: {errors[:3]}")
    wall = max(o[1] for o in out) - t0
    toks = sum(o[0] for o in out)
    return {
        "n": n,
        "aggregate_tokens_per_s": toks / wall,
        "wall_s": wall,
        "completion_tokens": toks,
        "per_request_tokens": [o[0] for o in out],
        "connection_retries": sum(retries),
    }


def section(ctx):
    plan = ctx.plan
    model_dir, m = plan["conc_model"], plan["conc_max_tokens"]
    w = ctx.workers.main(model_dir)
    log(f"concurrency: starting mlx_lm server on {rel(model_dir)}")
    server = ServerProcess(model_dir, env=sub_env(), stderr_path=Path(ctx.tmp) / "server.log")
    server.start()
    try:
        out = {
            "model": rel(model_dir),
            "max_tokens": m,
            "levels": plan["conc_levels"],
            "worker_command": shlex.join(w.command),
            "server_command": shlex.join(server.command),
            "client": "worker: all requests in one stdin write; server: one thread + urllib per request",
            "worker": {str(n): [] for n in plan["conc_levels"]},
            "server": {str(n): [] for n in plan["conc_levels"]},
        }
        ctx.res[SECTION] = out
        worker_once(w, 2, 4, "warm")  # warm-up, unmeasured
        server_once(server, 2, 4, "warm")
        for rep in range(plan["conc_reps"]):
            for n in plan["conc_levels"]:
                level(out, w, server, n, m, rep, plan["conc_reps"])
        summarize(ctx, out)
    finally:
        server.close()


def level(out, w, server, n, m, rep, reps):
    """One repetition at n concurrent requests, both sides (which goes first alternates)."""
    for which in ("worker", "server") if (rep + n) % 2 == 0 else ("server", "worker"):
        tag = f"{rep}{which[0]}{n}"
        try:
            r = worker_once(w, n, m, tag) if which == "worker" else server_once(server, n, m, tag)
        except Exception as e:  # one failed level must not lose the others
            r = {"n": n, "aggregate_tokens_per_s": None, "error": f"{type(e).__name__}: {e}"}
            log(f"concurrency {n} {which} failed: {r['error']}")
        out[which][str(n)].append(r)
    retried = out["server"][str(n)][-1].get("connection_retries")
    log(
        f"concurrency {n:>2} rep {rep + 1}/{reps}: worker "
        f"{report.fmt(out['worker'][str(n)][-1]['aggregate_tokens_per_s'])}, server "
        f"{report.fmt(out['server'][str(n)][-1]['aggregate_tokens_per_s'])} tokens/s"
        + (f" (server: {retried} connection(s) reset and retried)" if retried else "")
    )


def summarize(ctx, out):
    for which in ("worker", "server"):
        out[which + "_summary"] = {
            k: report.summarize([r["aggregate_tokens_per_s"] for r in v]) for k, v in out[which].items()
        }
    for which in ("worker", "server"):
        for k, v in out[which].items():
            failed = [r["error"] for r in v if r.get("error")]
            if failed:
                ctx.warn(
                    f"concurrency {k}, {which}: {len(failed)} of {len(v)} samples failed ({failed[0][:200]})"
                )
    retried = {k: sum(r.get("connection_retries") or 0 for r in v) for k, v in out["server"].items()}
    if any(retried.values()):
        ctx.warn(
            "mlx_lm server reset connections under a burst (http.server's listen backlog is 5); the client "
            "retried and the time counts against the server: "
            + ", ".join(f"{c} at {k} concurrent" for k, c in retried.items() if c)
        )


def rows(res):
    cc = res.get(SECTION)
    if not (cc and cc.get("worker_summary")):
        return []
    ws, ss = cc["worker_summary"], cc.get("server_summary", {})
    samples = lambda side, n: [r.get("aggregate_tokens_per_s") for r in (cc.get(side, {}).get(str(n)) or [])]
    out = [
        report.row(
            f"aggregate tokens/s, {n} concurrent",
            report.median_of(ws, str(n)),
            report.median_of(ss, str(n)),
            "tok/s",
            ours_label="worker",
            anchor_label="mlx_lm server",
            target_key="concurrency_vs_server" if n == 8 else None,
            paired=report.paired_ratio(samples("worker", n), samples("server", n)),
        )
        for n in cc["levels"]
    ]
    if "1" in ws and "8" in ws:
        out.append(
            report.row(
                "8 concurrent vs 1 stream (worker)",
                ws["8"]["median"],
                ws["1"]["median"],
                "tok/s",
                ours_label="8",
                anchor_label="1",
                target_key="concurrency_scaling",
            )
        )
    return out


def plot(res, stem, doc):
    """Aggregate tokens/s against concurrency (stem-concurrency.png); its line for the doc."""
    cc = res.get(SECTION)
    if not (cc and cc.get("worker_summary")):
        return None
    png = Path(f"{stem}-concurrency.png")
    levels = cc["levels"]
    ours = [cc["worker_summary"][str(n)]["median"] for n in levels]
    anchor = [report.median_of(cc.get("server_summary", {}), str(n)) for n in levels]
    report.plot_concurrency(
        png,
        levels,
        ours,
        anchor,
        f"{cc['model']}, {cc['max_tokens']} tokens/request, {res['machine']['cpu']}",
        single=ours[0] if levels[0] == 1 else None,
    )
    res["plot"] = rel(png)
    return f"![aggregate tokens/s against concurrency]({os.path.relpath(png, Path(doc).parent)})\n"


def models_note(plan):
    return (
        f"concurrency on {rel(plan['conc_model'])} (levels {plan['conc_levels']}, {plan['conc_reps']} reps, "
        f"{plan['conc_max_tokens']} tokens each)"
    )
