"""`make bench` section **workload**: a chatbot's traffic (bench/workload.jsonl: the club's system
prompt, 16 Portuguese conversations of 1-4 turns) replayed by 1-16 simulated users at once
through the worker and through `mlx_lm server` (bench/chat_replay.py), greedy, the same
max_tokens; per level tokens/s, first-token p50/p99, end-to-end p99 and the follow-up turns'
first token; the plot against users. Alone (prints the table):

    python -m bench.workload [--users 1,4,8] [--max-tokens 24] [--reps 1]
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

from bench import chat_replay, report
from bench.anchors import ServerProcess
from bench.common import BENCH, log, rel, sub_env
from bench.worker_client import WorkerProcess

SECTION = "workload"
PLAN = {
    "quick": dict(
        workload_model=BENCH,
        workload_levels=[1, 8],
        workload_reps=1,
        workload_max_tokens=16,
        workload_conversations=2,
    ),
    "full": dict(
        workload_model=BENCH,
        workload_levels=[1, 4, 8, 16],
        workload_reps=3,  # 2 left 8-user ratios of 1.07x and 1.28x in two runs 30 min apart
        workload_max_tokens=16,
        workload_conversations=4,
    ),
}


def section(ctx):
    """bench/workload.jsonl replayed by 1-16 simulated users: the worker vs mlx_lm server."""
    from core.prompt import accepts_system_role

    plan = ctx.plan
    model_dir = plan["workload_model"]
    w = ctx.workers.main(model_dir)
    tokenizer = ctx.tokenizer(model_dir)
    fold = not accepts_system_role(tokenizer)
    system, convs = chat_replay.load()
    log(f"workload: starting mlx_lm server on {rel(model_dir)}")
    server = ServerProcess(model_dir, env=sub_env(), stderr_path=Path(ctx.tmp) / "server-workload.log")
    server.start()
    try:
        senders = {
            "worker": chat_replay.worker_sender(w),
            "server": chat_replay.server_sender(server.port, fold),
        }
        for send in senders.values():  # the system prompt once (unmeasured): a running chatbot has it
            send([{"role": "system", "content": system}, {"role": "user", "content": "Olá"}], 2)
        out = {
            "model": rel(model_dir),
            "levels": plan["workload_levels"],
            "reps": plan["workload_reps"],
            "max_tokens": plan["workload_max_tokens"],
            "conversations_at_least": plan["workload_conversations"],
            "workload": rel(chat_replay.WORKLOAD),
            "system_prompt_tokens": len(tokenizer.encode(system)),
            "worker_command": shlex.join(w.command),
            "server_command": shlex.join(server.command),
            "system_folded_for_server": fold,
        }
        ctx.res[SECTION] = out
        runs = chat_replay.run_levels(
            senders,
            system,
            convs,
            plan["workload_levels"],
            plan["workload_reps"],
            plan["workload_max_tokens"],
            log=log,
            at_least=plan["workload_conversations"],
        )
        out["worker"], out["server"] = runs["worker"], runs["server"]
        out["worker_medians"] = chat_replay.medians(runs["worker"])
        out["server_medians"] = chat_replay.medians(runs["server"])
        for side in ("worker", "server"):
            for k, rs in runs[side].items():
                failed = [r["error"] for r in rs if r.get("error")]
                if failed:
                    ctx.warn(f"workload {k} users, {side}: {failed[0][:200]}")
    finally:
        server.close()


# Per level: (row name, metric, target key or None).
ROWS = (
    ("chatbot tokens/s, {n} users", "tokens_per_s", "tok/s", "workload_tokens_8"),
    ("chatbot first token p99, {n} users", "ttft_p99_ms", "ms", "workload_ttft_p99"),
    ("chatbot first token p50, {n} users", "ttft_p50_ms", "ms", None),
    (
        "chatbot follow-up turn first token p50 (cached history), {n} users",
        "follow_up_ttft_p50_ms",
        "ms",
        None,
    ),
    ("chatbot end-to-end p99, {n} users", "e2e_p99_ms", "ms", None),
)


def rows(res):
    """Per level: tokens/s, first-token p99/p50, follow-up first token, end-to-end p99."""
    wl = res.get(SECTION)
    if not wl or not wl.get("worker_medians"):
        return []
    out = []
    ours, theirs = wl["worker_medians"], wl.get("server_medians", {})
    samples = lambda side, k, m: [r.get(m) for r in wl[side].get(k, [])]
    for n in wl["levels"]:
        k = str(n)
        o, t = ours.get(k, {}), theirs.get(k, {})
        for name, metric, unit, target in ROWS:
            if target == "workload_tokens_8" and n != 8:
                target = None
            out.append(
                report.row(
                    name.format(n=n),
                    o.get(metric),
                    t.get(metric),
                    unit,
                    ours_label="worker",
                    anchor_label="mlx_lm server",
                    target_key=target,
                    paired=report.paired_ratio(samples("worker", k, metric), samples("server", k, metric)),
                )
            )
    return out


def plot(res, stem, doc):
    """Tokens/s and first-token time against users (stem-workload.png); its line for the doc.
    Records res["workload_png_rel"] (None without a workload) and res["workload_plot"]."""
    wl = res.get(SECTION)
    if not wl or not wl.get("worker_medians"):
        res["workload_png_rel"] = None
        return None
    png = Path(f"{stem}-workload.png")
    levels = wl["levels"]
    get = lambda side, m: [(wl.get(side + "_medians", {}).get(str(n)) or {}).get(m) for n in levels]
    metrics = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")
    report.plot_workload(
        png,
        levels,
        {m: get("worker", m) for m in metrics},
        {m: get("server", m) for m in metrics},
        f"{wl['model']}, {wl['max_tokens']} tokens/answer, {res['machine']['cpu']}, "
        f"load {res['load_start'][0]:.1f}",
    )
    res["workload_plot"] = rel(png)
    res["workload_png_rel"] = os.path.relpath(png, Path(doc).parent)
    return (
        f"![chatbot workload: tokens/s and first-token time against users, worker vs mlx_lm server]"
        f"({res['workload_png_rel']})\n"
    )


def models_note(plan):
    return (
        f"chatbot workload on {rel(plan['workload_model'])} (users {plan['workload_levels']}, "
        f"{plan['workload_reps']} reps, {plan['workload_max_tokens']} tokens/answer, "
        f"max(users, {plan['workload_conversations']}) conversations of bench/workload.jsonl)"
    )


def main(argv=None):
    from mlx_lm.utils import load_tokenizer

    from core.prompt import accepts_system_role

    p = argparse.ArgumentParser(prog="python -m bench.workload", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BENCH))
    p.add_argument("--users", default="1,4,8,16")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--worker-arg", action="append", default=[], help="extra worker argument (repeatable)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.users.split(",")]
    system, convs = chat_replay.load()
    fold = not accepts_system_role(load_tokenizer(Path(args.model)))
    w = WorkerProcess(["--model", args.model, *args.worker_arg], env=sub_env(FAST_BLAS_QUIET=1)).start()
    s = ServerProcess(args.model, env=sub_env(FAST_BLAS_QUIET=1)).start()
    try:
        senders = {"worker": chat_replay.worker_sender(w), "server": chat_replay.server_sender(s.port, fold)}
        for send in senders.values():  # warm-up: the system prompt, once (unmeasured)
            send([{"role": "system", "content": system}, {"role": "user", "content": "Olá"}], 2)
        out = chat_replay.run_levels(senders, system, convs, levels, args.reps, args.max_tokens, log=log)
    finally:
        w.close()
        s.close()
    ours, theirs = chat_replay.medians(out["worker"]), chat_replay.medians(out["server"])
    for k in ours:
        print(k, {m: (report.fmt(ours[k][m]), report.fmt(theirs[k][m])) for m in chat_replay.METRICS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
