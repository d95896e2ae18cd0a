"""A chatbot's traffic, replayed: the club's system prompt and multi-turn Portuguese conversations
(bench/workload.jsonl) from N simulated users at once, through the worker (stdio, `stream: true`)
and through `mlx_lm server` (/v1/chat/completions, SSE), greedy, the same max_tokens. The engine
of the workload section (bench/workload.py).

Each user replays its conversations turn by turn, sending the system prompt, the history so far
(its questions and the answers it got) and the next question, as a chat front end does. The
first question of each conversation starts with a nonce (per repetition, side and user), so no
cache has seen a conversation before; the system prompt is shared, as in production. Per level:
aggregate tokens/s (completion tokens / wall), time to first token p50/p99, end-to-end p99,
and the first-token time of follow-up turns (their history is a prefix of an earlier request).

`mlx_lm server` speaks HTTP/1.0 and closes each connection: one http.client connection per
request; a connection reset under a burst (http.server's listen backlog) is retried and the
time lost counts against the server.
"""

import http.client
import json
import math
import os
import threading
import time
import uuid
from pathlib import Path

import bench  # noqa: F401  (fast BLAS before mlx)
from bench import report
from bench.anchors import SERVER_ATTEMPTS

WORKLOAD = Path(__file__).with_name("workload.jsonl")


def load(path=WORKLOAD):
    """(system prompt, [{"id", "turns"}]) of a workload file: a {"system"} line, then one
    conversation per line."""
    system, convs = None, []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if "system" in rec:
            system = rec["system"]
        elif rec.get("turns"):
            convs.append(rec)
        else:
            raise ValueError(f"{path}:{n}: a line needs 'system' or a non-empty 'turns'")
    if system is None or not convs:
        raise ValueError(f"{path}: needs a 'system' line and at least one conversation")
    return system, convs


def system_prompt(path=WORKLOAD):
    return load(path)[0]


def percentile(values, q):
    """The q-th percentile (0-100) by linear interpolation; None for no values."""
    vals = sorted(report.clean(values))
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def assign(convs, users, at_least=4):
    """Conversations per user: max(users, at_least) conversations of the set in order (reused
    past its end), dealt round-robin, so each user has at least one and one user is not left
    with the whole set."""
    total = max(users, at_least)
    return [[convs[i % len(convs)] for i in range(u, total, users)] for u in range(users)]


# --------------------------------------------------------------------------- the two clients


def worker_sender(w):
    def send(messages, max_tokens):
        r = w.generate({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True})
        u = r.done["usage"]
        return {
            "ttft_s": r.client_ttft_s(),
            "e2e_s": r.t_done - r.t_sent,
            "text": r.done["text"],
            "completion_tokens": u["completion_tokens"],
            "prompt_tokens": u["prompt_tokens"],
            "cached_tokens": u.get("cached_tokens", 0),
            "retries": 0,
        }

    return send


def server_sender(port, fold_system=False, timeout=600):
    """fold_system: send the system prompt folded into the first user turn, as the worker
    renders it for a chat template without a system role (core/prompt.py)."""
    from core.prompt import fold_system as fold

    body_of = lambda messages, max_tokens: json.dumps(
        {
            "model": "default_model",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()

    def once(messages, max_tokens, t0):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body_of(messages, max_tokens),
                {"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"mlx_lm server answered {resp.status}: {resp.read()[:200]!r}")
            t_first, text, usage = None, [], {}
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    break
                msg = json.loads(data)
                usage = msg.get("usage") or usage
                for choice in msg.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        t_first = t_first or time.perf_counter()
                        text.append(piece)
            t_end = time.perf_counter()
        finally:
            conn.close()
        details = usage.get("prompt_tokens_details") or {}
        return {
            "ttft_s": (t_first or t_end) - t0,
            "e2e_s": t_end - t0,
            "text": "".join(text),
            "completion_tokens": usage.get("completion_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens", usage.get("cached_tokens")),
        }

    def send(messages, max_tokens):
        messages = fold(messages) if fold_system else messages
        t0 = time.perf_counter()
        for attempt in range(SERVER_ATTEMPTS):
            try:
                r = once(messages, max_tokens, t0)
                r["retries"] = attempt
                return r
            except (ConnectionError, http.client.RemoteDisconnected):
                if attempt == SERVER_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    return send


# --------------------------------------------------------------------------- the replay


def replay(send, system, convs, users, max_tokens, tag, at_least=4):
    """All users at once (a barrier), each through its conversations turn by turn.
    Returns the level's measurements; raises with the first error (request named)."""
    plan = assign(convs, users, at_least)
    turns, errors = [[] for _ in range(users)], []
    barrier = threading.Barrier(users + 1)

    def user(u):
        barrier.wait()
        try:
            for k, conv in enumerate(plan[u]):
                history = [{"role": "system", "content": system}]
                for t, question in enumerate(conv["turns"]):
                    q = f"(sessão {tag}-{u}-{k}) {question}" if t == 0 else question
                    r = send(history + [{"role": "user", "content": q}], max_tokens)
                    r.update(conv=conv["id"], turn=t, user=u)
                    turns[u].append(r)
                    history += [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": r.pop("text")},
                    ]
        except Exception as e:
            errors.append(f"user {u}, conversation {conv['id']} turn {t + 1}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    barrier.wait()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return summarize_level([r for rs in turns for r in rs], users, wall)


def summarize_level(turns, users, wall):
    ttft = [r["ttft_s"] * 1000.0 for r in turns]
    follow = [r["ttft_s"] * 1000.0 for r in turns if r["turn"] > 0]
    first = [r["ttft_s"] * 1000.0 for r in turns if r["turn"] == 0]
    toks = sum(r["completion_tokens"] for r in turns)
    return {
        "users": users,
        "requests": len(turns),
        "wall_s": wall,
        "completion_tokens": toks,
        "tokens_per_s": toks / wall if wall > 0 else None,
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "e2e_p50_ms": percentile([r["e2e_s"] * 1000.0 for r in turns], 50),
        "e2e_p99_ms": percentile([r["e2e_s"] * 1000.0 for r in turns], 99),
        "first_turn_ttft_p50_ms": percentile(first, 50),
        "follow_up_ttft_p50_ms": percentile(follow, 50),
        "connection_retries": sum(r.get("retries") or 0 for r in turns),
        "load": os.getloadavg()[0],
        "turns": turns,
    }


METRICS = (
    "tokens_per_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "e2e_p99_ms",
    "first_turn_ttft_p50_ms",
    "follow_up_ttft_p50_ms",
)


def run_levels(senders, system, convs, levels, reps, max_tokens, log=print, at_least=4):
    """{side: {str(users): [level results]}} for senders {"worker": f, "server": f}, the sides
    alternating first at each level and repetition."""
    out = {side: {str(n): [] for n in levels} for side in senders}
    sides = list(senders)
    for rep in range(reps):
        for n in levels:
            order = sides if (rep + n) % 2 == 0 else sides[::-1]
            for side in order:
                tag = f"{uuid.uuid4().hex[:6]}"
                try:
                    r = replay(senders[side], system, convs, n, max_tokens, tag, at_least)
                except Exception as e:  # one failed level must not lose the others
                    r = {"users": n, "error": f"{type(e).__name__}: {e}"}
                out[side][str(n)].append(r)
                log(
                    f"workload {n:>2} users rep {rep + 1}/{reps} {side}: "
                    + (
                        r.get("error")
                        or f"{report.fmt(r['tokens_per_s'])} tok/s, ttft p50 "
                        f"{report.fmt(r['ttft_p50_ms'])} p99 {report.fmt(r['ttft_p99_ms'])} ms, e2e p99 "
                        f"{report.fmt(r['e2e_p99_ms'])} ms, follow-up ttft p50 {report.fmt(r['follow_up_ttft_p50_ms'])} ms "
                        f"({r['requests']} requests, load {r['load']:.2f})"
                    )
                )
    return out


def medians(results):
    """{str(users): {metric: median over repetitions}} of run_levels' lists for one side."""
    return {k: {m: report.median([r.get(m) for r in rs]) for m in METRICS} for k, rs in results.items()}
