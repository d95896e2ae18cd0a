"""The two ways bench/soak.py sends its traffic: the worker's stdio, or HTTP through the
Express example (examples/express/bench/soak.js). Both return the same result dict:

  via, budget, requests, answered, lost, duplicated, late_tokens, errors ({code: count} for
  valid requests), garbage_sent, garbage_errors, cancel_sent, cancelled, latency_ms {p50,
  p99} (client side, requests that were not cancelled), samples [{answered, resident, rss,
  active, cache, counted, entries, hits, misses[, idle]}], seconds, exit_code, backend,
  resident_source.
"""

import collections
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent

READY_TIMEOUT_S = 180
QUIET_TIMEOUT_S = 120  # no message at all for this long with requests outstanding: a hang


def _percentile(xs, q):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return float(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))])


class WorkerProcess:
    """`python -m worker` with piped stdio; stdout lines parsed by a reader thread."""

    def __init__(self, args, env=None, root=ROOT):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "FAST_BLAS_QUIET": "1", **(env or {})},
        )
        self.messages = queue.Queue()
        self.stderr = collections.deque(maxlen=40)
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self):
        for line in self.proc.stdout:
            try:
                self.messages.put(orjson.loads(line))
            except orjson.JSONDecodeError:
                self.messages.put({"type": "not_json", "line": line[:200]})
        self.messages.put(None)

    def _read_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line.decode("utf-8", "replace").rstrip())

    def send(self, lines):
        self.proc.stdin.write(b"".join(lines))
        self.proc.stdin.flush()

    def get(self, timeout):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def fail(self, why):
        self.proc.kill()
        tail = "\n  ".join(list(self.stderr)[-15:])
        raise RuntimeError(f"soak: {why}; the worker's last log lines:\n  {tail}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _line(obj):
    return orjson.dumps(obj) + b"\n"


class Tally:
    """The bookkeeping both drivers share: terminals per id, tokens, latencies, samples."""

    def __init__(self, via, budget, n):
        self.r = dict(via=via, budget=budget, requests=n, garbage_sent=0, garbage_errors=0)
        self.r.update(cancel_sent=0, cancelled=0, late_tokens=0, backend="?", resident_source="?")
        self.terminals = collections.Counter()
        self.errors = collections.Counter()
        self.latencies = []
        self.samples = []
        self.t0 = time.perf_counter()

    def sample(self, stats, idle=False):
        """A memory sample from a `stats` message; idle: taken after the last answer (shown,
        not judged: memory under load is what the budget is about)."""
        m, c = stats["memory"], stats["prefix_cache"]
        self.r["resident_source"] = m.get("resident_source", "rss")
        self.samples.append(
            {
                "answered": len(self.terminals),
                "resident": m.get("resident_bytes", m["rss_bytes"]),
                "rss": m["rss_bytes"],
                "active": m["active_bytes"],
                "cache": m.get("cache_bytes", 0),
                "counted": c["bytes"],
                "entries": c["entries"],
                "hits": c["hits"],
                "misses": c["misses"],
                **({"idle": True} if idle else {}),
            }
        )

    def finish(self, ids, exit_code):
        r = self.r
        r["answered"] = len(self.terminals)
        r["lost"] = sum(1 for i in ids if self.terminals[i] == 0)
        r["duplicated"] = sum(1 for i in ids if self.terminals[i] > 1)
        r["errors"] = dict(self.errors)
        r["latency_ms"] = {"p50": _percentile(self.latencies, 0.5), "p99": _percentile(self.latencies, 0.99)}
        r["samples"] = self.samples
        r["seconds"] = round(time.perf_counter() - self.t0, 1)
        r["exit_code"] = exit_code
        return r


def run_stdio(items, budget, args):
    """The plan through one worker's stdin/stdout, at most args.concurrency outstanding."""
    requests = [it for it in items if "garbage" not in it]
    tally = Tally("stdio", budget, len(requests))
    w = WorkerProcess(
        ["--model", args.model, "--prefix-cache-bytes", str(budget), *args.worker_arg], root=args.worker_root
    )
    try:
        ready = w.get(READY_TIMEOUT_S)
        if not ready or ready.get("type") != "ready":
            w.fail(f"no ready message ({ready})")
        tally.r["backend"] = ready.get("backend", "?")
        _drive(w, items, tally, args)
        w.send([_line({"op": "stats"})])
        while (m := w.get(QUIET_TIMEOUT_S)) is not None and m.get("type") != "stats":
            pass
        if m:
            tally.sample(m, idle=True)
        w.proc.stdin.close()
        code = w.proc.wait(60)
    finally:
        w.close()
    return tally.finish([r["id"] for r in requests], code)


def _drive(w, items, tally, args):
    pending = collections.deque(items)
    outstanding, tokens, sent_at, cancel_at = set(), collections.Counter(), {}, {}
    sent = 0
    while pending or outstanding:
        lines = []
        while pending and len(outstanding) < args.concurrency:
            it = pending.popleft()
            if "garbage" in it:
                lines.append(it["garbage"].encode() + b"\n")
                tally.r["garbage_sent"] += 1
                continue
            req = {k: v for k, v in it.items() if k != "cancel_after"}
            lines.append(_line(req))
            outstanding.add(it["id"])
            sent_at[it["id"]] = time.perf_counter()
            sent += 1
            if it.get("cancel_after") == 0:
                lines.append(_line({"op": "cancel", "id": it["id"]}))
                tally.r["cancel_sent"] += 1
            elif "cancel_after" in it:
                cancel_at[it["id"]] = it["cancel_after"]
            if sent % args.stats_every == 0:
                lines.append(_line({"op": "stats"}))
        if lines:
            w.send(lines)
        m = w.get(QUIET_TIMEOUT_S)
        if m is None:
            w.fail(
                f"no message for {QUIET_TIMEOUT_S} s with {len(outstanding)} outstanding (or stdout closed)"
            )
        replies = [m]
        while (more := w.get(0)) is not None:  # everything already read, then send again
            replies.append(more)
        cancels = []
        for m in replies:
            kind, rid = m.get("type"), m.get("id")
            if kind == "token":
                if tally.terminals[rid]:
                    tally.r["late_tokens"] += 1
                tokens[rid] += 1
                if cancel_at.get(rid) is not None and tokens[rid] >= cancel_at[rid]:
                    cancels.append(_line({"op": "cancel", "id": rid}))
                    cancel_at[rid] = None
                    tally.r["cancel_sent"] += 1
            elif kind in ("done", "error") and rid is not None:
                tally.terminals[rid] += 1
                outstanding.discard(rid)
                if len(tally.terminals) % 1000 == 0:
                    print(
                        f"soak ({tally.r['budget']:,} B): {len(tally.terminals):,} answered", file=sys.stderr
                    )
                if kind == "error":
                    tally.errors[m.get("code")] += 1
                elif m["finish_reason"] == "cancelled":
                    tally.r["cancelled"] += 1
                else:
                    tally.latencies.append(1000 * (time.perf_counter() - sent_at[rid]))
            elif kind == "error":
                tally.r["garbage_errors"] += 1
            elif kind == "stats":
                tally.sample(m)
            elif kind == "not_json":
                w.fail(f"a stdout line that is not JSON: {m['line']!r}")
        if cancels:
            w.send(cancels)


def run_http(items, budget, args):
    """The plan through the Express example (node examples/express/bench/soak.js), which
    prints one JSON line per stats sample and a summary line at the end."""
    requests = [it for it in items if "garbage" not in it]
    tally = Tally("http", budget, len(requests))
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
        plan_path = f.name
    cmd = ["node", str(ROOT / "examples/express/bench/soak.js"), "--plan", plan_path]
    cmd += ["--model", args.model, "--budget", str(budget), "--concurrency", str(args.concurrency)]
    cmd += ["--stats-every", str(args.stats_every)] + [f"--worker-arg={a}" for a in args.worker_arg]
    env = {**os.environ, "PYTHON": sys.executable, "FAST_BLAS_QUIET": "1"}
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env=env)
        summary = None
        for line in proc.stdout:
            msg = orjson.loads(line)
            if msg["type"] == "stats":
                tally.sample(msg["stats"], idle=msg.get("idle", False))
                tally.samples[-1]["answered"] = msg["answered"]
            elif msg["type"] == "summary":
                summary = msg
        code = proc.wait()
    finally:
        os.unlink(plan_path)
    if summary is None:
        raise RuntimeError(f"soak: examples/express/bench/soak.js exited {code} without a summary")
    for key in ("garbage_sent", "garbage_errors", "cancel_sent", "cancelled", "late_tokens", "backend"):
        tally.r[key] = summary[key]
    tally.terminals.update(summary["terminals"])
    tally.errors.update(summary["errors"])
    tally.latencies = summary["latencies_ms"]
    return tally.finish([r["id"] for r in requests], summary.get("worker_exit_code", code))
