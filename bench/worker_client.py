"""Drive `python -m worker` over its stdio protocol, as the Node client does (docs/PROTOCOL.md).

Every protocol line is timestamped (time.perf_counter) by a reader thread the moment it is
read from the pipe, so client-side timings (first token, done) are what a parent process
sees, pipe and JSON included.

    with WorkerProcess(["--model", "models/bench-mistral"]) as w:
        r = w.generate({"prompt": "Olá", "max_tokens": 32, "stream": True})
        r.client_tokens_per_s(), r.done["timing"]
"""

import itertools
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    id: str
    t_sent: float
    t_first: float = None  # first `token` message read by the client
    t_done: float = None  # the terminal message read by the client
    n_token_messages: int = 0
    done: dict = None  # the `done` message (None if it ended with an error)
    error: dict = None

    @property
    def completion_tokens(self):
        return (self.done or {}).get("usage", {}).get("completion_tokens", 0)

    def client_ttft_s(self):
        return None if self.t_first is None else self.t_first - self.t_sent

    def client_tokens_per_s(self):
        """Decode rate seen by the client: tokens after the first over first-token -> done."""
        n = self.completion_tokens
        if self.t_first is None or self.t_done is None or n < 2 or self.t_done <= self.t_first:
            return None
        return (n - 1) / (self.t_done - self.t_first)


@dataclass
class _Pending:
    result: Result
    event: threading.Event = field(default_factory=threading.Event)


class WorkerError(RuntimeError):
    pass


class WorkerProcess:
    """One `python -m worker ARGS` child; requests may be sent from any thread."""

    def __init__(self, args, env=None, python=None, ready_timeout=300, stderr_path=None):
        self.args = list(args)
        self.python = python or sys.executable
        self.command = [self.python, "-m", "worker", *self.args]
        self.env = dict(os.environ if env is None else env)
        self.stderr_path = stderr_path
        self.ready_timeout = ready_timeout
        self.proc = None
        self.ready = None
        self._pending = {}
        self._others = queue.Queue()  # pong, stats, id-less errors
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._ready_event = threading.Event()
        self._reader = None
        self._stderr_file = None

    # --------------------------------------------------------------- lifecycle
    def start(self):
        if self.stderr_path:
            self._stderr_file = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file or subprocess.DEVNULL,
            bufsize=0,
        )
        self._reader = threading.Thread(target=self._read, name="worker-stdout", daemon=True)
        self._reader.start()
        if not self._ready_event.wait(self.ready_timeout) or self.ready is None:
            self.close()
            raise WorkerError(
                f"no ready message from {' '.join(self.command)} "
                f"(exit status {self.proc.poll()}; see {self.stderr_path or 'stderr'})"
            )
        return self

    def close(self, timeout=15):
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()  # EOF: the worker finishes and exits 0
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
        finally:
            if self._stderr_file:
                self._stderr_file.close()
                self._stderr_file = None
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------- I/O
    def _read(self):
        out = self.proc.stdout
        for line in iter(out.readline, b""):
            now = time.perf_counter()
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                self._others.put({"type": "garbage", "line": line.decode(errors="replace")})
                continue
            kind = msg.get("type")
            if kind == "ready":
                self.ready = msg
                self._ready_event.set()
                continue
            p = self._pending.get(msg.get("id")) if kind in ("token", "done", "error") else None
            if p is None:
                self._others.put(msg)
                continue
            r = p.result
            if kind == "token":
                if r.t_first is None:
                    r.t_first = now
                r.n_token_messages += 1
            else:
                r.t_done = now
                if kind == "done":
                    r.done = msg
                    if r.t_first is None and msg.get("usage", {}).get("completion_tokens"):
                        r.t_first = now  # non-streaming: the text arrives with done
                else:
                    r.error = msg
                with self._lock:
                    self._pending.pop(r.id, None)
                p.event.set()
        self._ready_event.set()  # EOF before ready: unblock start()
        with self._lock:
            pend = list(self._pending.values())
            self._pending.clear()
        for p in pend:  # the worker died: fail what is in flight
            p.result.error = {
                "type": "error",
                "id": p.result.id,
                "code": "worker_exited",
                "message": f"worker exited ({self.proc.poll()})",
            }
            p.result.t_done = time.perf_counter()
            p.event.set()

    def _write(self, data):
        with self._write_lock:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def submit_many(self, requests):
        """Send several requests in one write; returns their _Pending handles (in order)."""
        handles, lines = [], []
        t = time.perf_counter()
        for req in requests:
            req = dict(req)
            req.setdefault("id", f"b{next(self._ids)}")
            h = _Pending(Result(id=req["id"], t_sent=t))
            with self._lock:
                self._pending[req["id"]] = h
            handles.append(h)
            lines.append(orjson.dumps(req) + b"\n")
        t = time.perf_counter()
        for h in handles:
            h.result.t_sent = t
        self._write(b"".join(lines))
        return handles

    def wait(self, handles, timeout=600):
        deadline = time.perf_counter() + timeout
        for h in handles:
            if not h.event.wait(max(0.0, deadline - time.perf_counter())):
                raise WorkerError(f"request {h.result.id} got no terminal message in {timeout}s")
        return [h.result for h in handles]

    def generate(self, request, timeout=600):
        (r,) = self.wait(self.submit_many([request]), timeout)
        if r.error:
            raise WorkerError(f"worker error: {r.error}")
        return r

    def generate_many(self, requests, timeout=600):
        """All at once (one write), wait for all; raises on any error."""
        results = self.wait(self.submit_many(requests), timeout)
        errors = [r.error for r in results if r.error]
        if errors:
            raise WorkerError(f"worker errors: {errors[:3]}")
        return results

    def control(self, op, timeout=30):
        """stats or ping; returns the answer."""
        self._write(orjson.dumps({"op": op}) + b"\n")
        deadline = time.perf_counter() + timeout
        want = {"stats": "stats", "ping": "pong"}[op]
        while True:
            msg = self._others.get(timeout=max(0.01, deadline - time.perf_counter()))
            if msg.get("type") == want:
                return msg
