"""`make bench` section **decode**: one stream, the worker (`stream: true`, timed on the client
from the first `token` message to `done`) vs `mlx_lm.stream_generate` in this process (from its
first response with text to the last), the same prompt ids, greedy, alternating; each rep paired
with a short memory-bandwidth probe (the bandwidth section's rows use them); plus a second worker
under `FAST_BLAS=0`."""

import os
import shlex

from bench import machine, report
from bench.anchors import stream_generate_once
from bench.common import BENCH, log, rel, weights_bytes

SECTION = "decode"
PLAN = {
    "quick": dict(decode_model=BENCH, decode_reps=3, decode_max_tokens=24, decode_noblas_reps=1),
    "full": dict(decode_model=BENCH, decode_reps=5, decode_max_tokens=64, decode_noblas_reps=2),
}
MESSAGES = [{"role": "user", "content": "Qual é o estádio do Farense e quando foi inaugurado?"}]


def worker_once(w, max_tokens):
    r = w.generate({"messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    return {
        "tokens_per_s": r.client_tokens_per_s(),
        "own_tokens_per_s": r.done["timing"]["tokens_per_s"],
        "completion_tokens": r.completion_tokens,
        "prompt_tokens": r.done["usage"]["prompt_tokens"],
        "token_messages": r.n_token_messages,
        "client_ttft_s": r.client_ttft_s(),
        "timing": r.done["timing"],
        "finish_reason": r.done["finish_reason"],
    }


def section(ctx):
    from mlx_lm import load

    from core.prompt import encode_prompt

    plan, workers = ctx.plan, ctx.workers
    model_dir, n = plan["decode_model"], plan["decode_max_tokens"]
    log(f"decode: loading {rel(model_dir)} in-process for mlx_lm.stream_generate")
    model, tokenizer = load(str(model_dir))
    ctx.tokenizers[model_dir] = tokenizer
    ids = encode_prompt(tokenizer, MESSAGES)
    w = workers.main(model_dir)
    wn = None
    if plan["decode_noblas_reps"]:
        wn = workers.start("noblas", model_dir, env_extra={"FAST_BLAS": "0"})
    out = {
        "model": rel(model_dir),
        "max_tokens": n,
        "prompt_tokens": len(ids),
        "worker_command": shlex.join(w.command),
        "anchor": "mlx_lm.stream_generate (in-process, greedy)",
        "worker": [],
        "stream_generate": [],
        "worker_noblas": [],
        "limit_tokens_per_s": [],
        "load": [],
        "worker_noblas_command": ("FAST_BLAS=0 " + shlex.join(wn.command)) if wn else None,
    }
    ctx.res[SECTION] = out
    # warm-up, unmeasured
    worker_once(w, 4)
    stream_generate_once(model, tokenizer, ids, 4)
    if wn:
        worker_once(wn, 2)
    wb = weights_bytes(model_dir)
    for rep in range(plan["decode_reps"]):
        # the machine's read bandwidth right before this rep: the limit it is paired with
        bw = max(machine.memory_read_bandwidth(gib=0.25, repeats=3, samples=True))
        out["limit_tokens_per_s"].append(bw / wb)
        for which in ("worker", "anchor") if rep % 2 == 0 else ("anchor", "worker"):
            if which == "worker":
                out["worker"].append(worker_once(w, n))
            else:
                out["stream_generate"].append(stream_generate_once(model, tokenizer, ids, n))
        out["load"].append(os.getloadavg()[0])
        log(
            f"decode rep {rep + 1}/{plan['decode_reps']}: worker {report.fmt(out['worker'][-1]['tokens_per_s'])} "
            f"(own {report.fmt(out['worker'][-1]['own_tokens_per_s'])}), stream_generate "
            f"{report.fmt(out['stream_generate'][-1]['tokens_per_s'])} tokens/s; limit {bw / wb:.1f} tokens/s "
            f"({bw / 1e9:.1f} GB/s); load {out['load'][-1]:.2f}"
        )
        if wn and rep < plan["decode_noblas_reps"]:
            r = worker_once(wn, n)
            out["worker_noblas"].append(r)
            log(f"decode rep {rep + 1}: worker FAST_BLAS=0 {report.fmt(r['tokens_per_s'])} tokens/s")
    if out["worker"] and out["worker"][0]["prompt_tokens"] != len(ids):
        log(
            f"warning: the worker's prompt has {out['worker'][0]['prompt_tokens']} tokens, the anchor's {len(ids)}"
        )
    summarize(out)
    if wn:
        workers.stop("noblas")
    del model
    import mlx.core as mx

    mx.clear_cache()


def summarize(out):
    tps = lambda key, field="tokens_per_s": report.summarize([r[field] for r in out[key]])
    out["worker_summary"] = tps("worker")
    out["worker_own_summary"] = tps("worker", "own_tokens_per_s")
    out["stream_generate_summary"] = tps("stream_generate")
    out["stream_generate_own_summary"] = tps("stream_generate", "own_generation_tps")
    out["worker_noblas_summary"] = tps("worker_noblas")


def rows(res):
    dec = res.get(SECTION)
    if not dec:
        return []
    samples = lambda k: [r.get("tokens_per_s") for r in (dec.get(k) or [])]
    return [
        report.row(
            "decode tokens/s, 1 stream",
            report.median_of(dec, "worker_summary"),
            report.median_of(dec, "stream_generate_summary"),
            "tok/s",
            ours_label="worker, client",
            anchor_label="stream_generate",
            target_key="decode",
            paired=report.paired_ratio(samples("worker"), samples("stream_generate")),
            note=f"{dec['model']}, {dec['max_tokens']} tokens",
        ),
        report.row(
            "decode tokens/s, own timing",
            report.median_of(dec, "worker_own_summary"),
            report.median_of(dec, "stream_generate_own_summary"),
            "tok/s",
            ours_label="done.timing",
            anchor_label="generation_tps",
        ),
    ]


def blas_rows(res):
    """The worker with the optimised BLAS vs FAST_BLAS=0."""
    dec = res.get(SECTION)
    if not (dec and dec.get("worker_noblas")):
        return []
    return [
        report.row(
            "optimised BLAS, decode",
            report.median_of(dec, "worker_summary"),
            report.median_of(dec, "worker_noblas_summary"),
            "tok/s",
            ours_label="BLAS on",
            anchor_label="FAST_BLAS=0",
        )
    ]


def models_note(plan):
    return f"decode on {rel(plan['decode_model'])} ({plan['decode_reps']} reps x {plan['decode_max_tokens']} tokens)"
