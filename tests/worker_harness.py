"""Spawn the real worker (`python -m worker`), talk to it, and check every line it writes.

Every stdout line is parsed and validated against docs/protocol.schema.json (jsonschema,
Draft 2020-12); violations are collected in `Worker.violations` and `Worker.close()` fails the
test if there are any. stderr is drained into `Worker.stderr_lines`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-mistral"
SCHEMA = json.loads((ROOT / "docs" / "protocol.schema.json").read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA)
REQUEST_VALIDATOR = Draft202012Validator({**SCHEMA, "$ref": "#/$defs/request"})
TERMINAL = ("done", "error")


def ensure_tiny_model():
    if not (TINY / "config.json").exists():
        subprocess.run([sys.executable, "-m", "train.tiny_model", "--out", str(TINY)], cwd=ROOT, check=True)


def worker_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("FAST_BLAS_QUIET", "1")
    env.pop("WORKER_TEST_IGNORE_EOS", None)
    env.pop("WORKER_TEST_FAULT", None)
    env.pop("WORKER_TEST_PRINT", None)
    env.pop("WORKER_TEST_ECHO", None)
    env.update(extra or {})
    return env


def spawn_raw(env=None, stderr=subprocess.PIPE):
    """The worker on the tiny model as a bare Popen, stdin and stdout piped, for tests that must
    control how (or whether) its output is read, which Worker's reader threads would not allow."""
    ensure_tiny_model()
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", str(TINY)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=worker_env(env),
    )


class Worker:
    def __init__(self, *args, model=None, adapter=None, env=None, wait_ready=True, ready_timeout=90):
        ensure_tiny_model()
        cmd = [sys.executable, "-m", "worker"]
        if model is not False:
            cmd += ["--model", str(model or TINY)]
        if adapter:
            cmd += ["--adapter", str(adapter)]
        cmd += [str(a) for a in args]
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(env),
        )
        self.messages = []
        self.raw_lines = []
        self.violations = []
        self.stderr_lines = []
        self.cond = threading.Condition()  # notified by stdout messages
        self.err_cond = threading.Condition()  # notified by stderr lines
        self.stdout_closed = False
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()
        self.ready = self.wait_for(lambda m: m["type"] == "ready", ready_timeout) if wait_ready else None

    # ---------------------------------------------------------------- reading
    def _read_stdout(self):
        for raw in self.proc.stdout:
            with self.cond:
                self.raw_lines.append(raw)
                try:
                    msg = json.loads(raw)
                except ValueError as e:
                    self.violations.append(f"not JSON: {raw[:200]!r} ({e})")
                    self.cond.notify_all()
                    continue
                errors = list(VALIDATOR.iter_errors(msg))
                if errors or not raw.endswith(b"\n"):
                    self.violations.append(f"schema: {raw[:300]!r}: {[e.message for e in errors][:3]}")
                if not self.messages and msg.get("type") != "ready":
                    self.violations.append(f"first message is not ready: {raw[:200]!r}")
                if self.messages and msg.get("type") == "ready":
                    self.violations.append("a second ready message")
                self.messages.append(msg)
                self.cond.notify_all()
        with self.cond:
            self.stdout_closed = True
            self.cond.notify_all()

    def _read_stderr(self):
        for raw in self.proc.stderr:
            with self.err_cond:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.err_cond.notify_all()

    def wait_for_stderr(self, text, timeout=60):
        """The first stderr line containing `text`, waiting for it: stderr has its own reader
        thread, so a line the worker wrote before a stdout message can arrive after it."""

        def found():
            return next((line for line in self.stderr_lines if text in line), None)

        with self.err_cond:
            if not self.err_cond.wait_for(found, timeout):
                raise AssertionError(
                    f"no stderr line with {text!r} in {timeout} s: {self.stderr_lines[-15:]}"
                )
            return found()

    # ---------------------------------------------------------------- writing
    def send(self, *items):
        """Each item: a dict (sent as JSON), str or bytes (sent as is, a newline added)."""
        data = b"".join(self._encode(i) for i in items)
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send_raw(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    @staticmethod
    def _encode(item):
        if isinstance(item, dict):
            return json.dumps(item, ensure_ascii=False).encode() + b"\n"
        if isinstance(item, str):
            item = item.encode("utf-8", "surrogatepass")
        return item if item.endswith(b"\n") else item + b"\n"

    def close_stdin(self):
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass

    # ---------------------------------------------------------------- waiting
    def wait_for(self, pred, timeout=60, start=0):
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.messages):
                    if pred(self.messages[i]):
                        return self.messages[i]
                    i += 1
                if self.stdout_closed:
                    raise AssertionError(
                        f"stdout closed before the expected message; stderr tail: {self.stderr_lines[-15:]}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out waiting for a message; last: {self.messages[-3:]}; "
                        f"stderr tail: {self.stderr_lines[-15:]}"
                    )
                self.cond.wait(left)

    def terminal(self, rid, timeout=60, start=0):
        return self.wait_for(lambda m: m.get("id") == rid and m["type"] in TERMINAL, timeout, start)

    def request(self, rid, timeout=60, **fields):
        """Send one generation request and return its terminal message (done or error)."""
        mark = self.mark()
        self.send({"id": rid, **fields})
        return self.terminal(rid, timeout, start=mark)

    def error_after(self, mark, timeout=30):
        return self.wait_for(lambda m: m["type"] == "error", timeout, start=mark)

    def mark(self):
        with self.cond:
            return len(self.messages)

    def for_id(self, rid):
        with self.cond:
            return [m for m in self.messages if m.get("id") == rid]

    def tokens(self, rid):
        return [m["text"] for m in self.for_id(rid) if m["type"] == "token"]

    def ping(self, rid="p", timeout=30):
        self.send({"op": "ping", "id": rid})
        return self.wait_for(lambda m: m["type"] == "pong" and m["id"] == rid, timeout)

    def stats(self, timeout=30):
        mark = self.mark()
        self.send({"op": "stats"})
        return self.wait_for(lambda m: m["type"] == "stats", timeout, start=mark)

    def wait_exit(self, timeout=30):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker did not exit in {timeout}s; stderr: {self.stderr_lines[-15:]}"
            ) from None

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def close(self, check=True):
        """Stop the worker (EOF, then SIGKILL if needed) and fail on schema violations."""
        if self.proc.poll() is None:
            self.close_stdin()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.join(5)
        self._err.join(5)
        if check:
            assert not self.violations, self.violations[:5]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(check=exc_type is None)


def done_text_matches_tokens(worker, rid):
    done = worker.terminal(rid)
    return "".join(worker.tokens(rid)) == done["text"]
