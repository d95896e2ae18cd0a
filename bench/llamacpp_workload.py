"""`make bench` section **llamacpp_workload**: the chatbot workload (bench/workload.jsonl, as the
workload section replays it) through the worker's llama.cpp engine (`--engine llamacpp`) and
through llama.cpp's own `llama-server` (make llama-server) on the same GGUF (Q8_0 of
SmolLM2-135M-Instruct, make base-model; of the random bench model in the quick run or without
it) and threads, alternating, at 1/4/8/16 simulated users. llama-server runs with its best
settings for a chatbot: parallel slots = users (a fresh server per level), continuous batching
and its prompt cache (defaults), OpenAI chat endpoint rendering the GGUF's own template (the
same prompt ids as core/prompt.py's: the usage's prompt tokens are compared in the results). Goal (issue 26): tokens/s >= 1.0x llama-server's
at 8 users with a p99 first token no worse. Skipped with a warning without llama.cpp or
llama-server."""

import os
import shlex
import socket
from pathlib import Path

from bench import chat_replay, report
from bench.common import ROOT, log, rel, sub_env
from bench.llamacpp import BENCH_REL, SMOLLM2, Server, gguf_files, server_binary
from bench.worker_client import WorkerProcess

SECTION = "llamacpp_workload"
PLAN = {
    "quick": dict(lw_model=BENCH_REL, lw_levels=(1, 4), lw_reps=1, lw_max_tokens=24, lw_conversations=4),
    # the real model: a random one's answers (control tokens, broken UTF-8) come back as text that
    # each side writes differently, so follow-up turns would not carry the same history
    "full": dict(lw_model=SMOLLM2, lw_levels=(1, 4, 8, 16), lw_reps=2, lw_max_tokens=64, lw_conversations=4),
}
GGUF_TYPE = "Q8_0"
CONTEXT = 2048


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def section(ctx):
    from core import llamacpp

    binary = server_binary()
    if not llamacpp.installed() or binary is None:
        ctx.warn("llamacpp_workload: skipped: needs `make llamacpp` and `make llama-server`")
        return
    plan, threads = ctx.plan, os.cpu_count() or 1
    model_dir = ROOT / plan["lw_model"]
    if not (model_dir / "config.json").is_file():
        ctx.warn(f"llamacpp_workload: {plan['lw_model']} is missing (make base-model): on {BENCH_REL}")
        model_dir = ROOT / BENCH_REL
    gguf = gguf_files(model_dir, (GGUF_TYPE,))[GGUF_TYPE]
    system, convs = chat_replay.load()
    max_users = max(plan["lw_levels"])
    args = ["--model", str(model_dir), "--engine", "llamacpp", "--gguf", str(gguf)]
    args += ["--max-batch", str(max_users), "--context-length", str(CONTEXT)]
    w = WorkerProcess(args, env=sub_env(), stderr_path=Path(ctx.tmp) / "worker-llamacpp.log")
    w.start()
    out = ctx.res[SECTION] = {
        "model": rel(model_dir),
        "gguf": rel(gguf),
        "levels": plan["lw_levels"],
        "max_tokens": plan["lw_max_tokens"],
        "worker_command": shlex.join(w.command),
        "worker": {},
        "server": {},
        "server_commands": {},
    }
    try:
        send_worker = chat_replay.worker_sender(w)
        send_worker([{"role": "system", "content": system}, {"role": "user", "content": "Olá"}], 2)
        for rep in range(plan["lw_reps"]):
            for n in plan["lw_levels"]:
                server = Server(binary, gguf, threads, CONTEXT * n, free_port(), parallel=n)
                out["server_commands"][str(n)] = " ".join(server.command)
                try:
                    send_server = chat_replay.server_sender(int(server.url.rsplit(":", 1)[1]))
                    send_server(
                        [{"role": "system", "content": system}, {"role": "user", "content": "Olá"}], 2
                    )
                    sides = {"worker": send_worker, "server": send_server}
                    for side in sides if (rep + n) % 2 == 0 else list(sides)[::-1]:
                        r = level(sides[side], system, convs, n, plan, f"{side}-{rep}-{n}")
                        out[side].setdefault(str(n), []).append(r)
                        log(f"llamacpp workload {n} users rep {rep + 1} {side}: " + describe(r))
                finally:
                    server.close()
    finally:
        w.close()
    for side in ("worker", "server"):
        out[f"{side}_medians"] = chat_replay.medians(out[side])


def level(send, system, convs, n, plan, tag):
    try:
        return chat_replay.replay(
            send, system, convs, n, plan["lw_max_tokens"], tag, plan["lw_conversations"]
        )
    except Exception as e:  # one failed level must not lose the others
        return {"users": n, "error": f"{type(e).__name__}: {e}"}


def describe(r):
    if r.get("error"):
        return r["error"]
    return (
        f"{report.fmt(r['tokens_per_s'])} tok/s, ttft p50 {report.fmt(r['ttft_p50_ms'])} p99 "
        f"{report.fmt(r['ttft_p99_ms'])} ms ({r['requests']} requests, load {r['load']:.2f})"
    )


def rows(res):
    out = res.get(SECTION)
    if not out:
        return []
    rows = []
    for n in out["levels"]:
        ours, anchor = out["worker_medians"].get(str(n), {}), out["server_medians"].get(str(n), {})
        for name, metric, unit in (
            ("tokens/s", "tokens_per_s", "tok/s"),
            ("first token p99", "ttft_p99_ms", "ms"),
        ):
            rows.append(
                report.row(
                    f"llama.cpp chatbot {name}, {n} users",
                    ours.get(metric),
                    anchor.get(metric),
                    unit,
                    ours_label="worker --engine llamacpp",
                    anchor_label="llama-server",
                    note=f"{out['model']} {GGUF_TYPE}",
                )
            )
    return rows


def models_note(plan):
    levels = "/".join(map(str, plan["lw_levels"]))
    return f"llamacpp_workload on {plan['lw_model']} {GGUF_TYPE} ({levels} users, {plan['lw_reps']} reps)"
