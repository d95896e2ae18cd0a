"""The worker's life: EOF, shutdown, SIGTERM, parent death, overload and backpressure.

Each test starts its own worker on models/tiny-mistral (about 2 s each).
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import ROOT, TINY, VALIDATOR, Worker, ensure_tiny_model, spawn_raw, worker_env  # noqa: E402

PROMPT = "Quando foi fundado o Farense?"
LONG = {"WORKER_TEST_IGNORE_EOS": "1"}


def check_lines(raw):
    msgs = []
    for line in raw.splitlines():
        msg = json.loads(line)
        assert not list(VALIDATOR.iter_errors(msg)), msg
        msgs.append(msg)
    assert msgs and msgs[0]["type"] == "ready"
    assert [m["type"] for m in msgs].count("ready") == 1
    return msgs


def test_eof_finishes_everything_read_then_exits_0():
    ensure_tiny_model()
    script = (
        'printf \'%s\\n\' \'{"id":"1","prompt":"Olá"}\' '
        '\'{"id":"2","prompt":"Qual é o estádio?","stream":true}\' '
        '\'{"id":"3","prompt":"Quando foi fundado o Farense?","max_tokens":300}\' '
        "'not json' "
        f"| {sys.executable} -m worker --model {TINY} --log-format json"
    )
    env = worker_env(LONG)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    msgs = check_lines(proc.stdout.decode())
    by_id = {}
    for m in msgs:
        if m["type"] in ("done", "error"):
            by_id.setdefault(m["id"], []).append(m)
    assert sorted(k for k in by_id if k) == ["1", "2", "3"]
    assert all(len(v) == 1 and v[0]["type"] == "done" for k, v in by_id.items() if k)
    assert by_id["3"][0]["finish_reason"] == "length" and by_id["3"][0]["usage"]["completion_tokens"] == 300
    assert [e["code"] for e in by_id[None]] == ["bad_json"]
    tokens = "".join(m["text"] for m in msgs if m["type"] == "token" and m["id"] == "2")
    assert tokens == by_id["2"][0]["text"]
    assert time.monotonic() - t0 < 60
    # --log-format json: the worker's own log lines are JSON objects.
    logs = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.startswith("{")]
    assert any(rec.get("level") == "info" and "ready" in rec.get("msg", "") for rec in logs)


def _long_streams(w, n, max_tokens=2000):
    for i in range(n):
        w.send({"id": f"s{i}", "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens, "stream": True})
    for i in range(n):
        w.wait_for(lambda m, i=i: m.get("id") == f"s{i}" and m["type"] == "token")


def _all_cancelled(w, n):
    for i in range(n):
        d = w.terminal(f"s{i}")
        assert d["type"] == "done" and d["finish_reason"] == "cancelled", d
        assert "".join(w.tokens(f"s{i}")) == d["text"] and d["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("how", ["sigterm", "shutdown"])
def test_sigterm_and_shutdown_cancel_in_flight_and_exit_0_quickly(how, engine_args):
    with Worker("--max-batch", "2", *engine_args, env=LONG) as w:
        _long_streams(w, 2)
        w.send({"id": "queued", "prompt": PROMPT, "max_tokens": 100}, {"op": "stats"})
        assert w.wait_for(lambda m: m["type"] == "stats")["queued"] == 1
        t0 = time.monotonic()
        if how == "sigterm":
            w.signal(signal.SIGTERM)
        else:
            w.send({"op": "shutdown"})
        rc = w.wait_exit(10)
        elapsed = time.monotonic() - t0
        assert rc == 0 and elapsed < 2.0, (rc, elapsed)
        w._out.join(5)
        _all_cancelled(w, 2)
        q = w.terminal("queued")
        assert q["finish_reason"] == "cancelled" and q["text"] == "" and q["timing"]["ttft_ms"] is None


def test_sigterm_exits_even_when_stdout_is_not_read():
    proc = spawn_raw(LONG, stderr=subprocess.DEVNULL)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        for i in range(4):
            proc.stdin.write(b'{"id":"f%d","prompt":"x","max_tokens":2000,"stream":true}\n' % i)
        proc.stdin.flush()
        time.sleep(1.5)  # the pipe fills up; the worker blocks writing
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(10)
        assert rc == 0 and time.monotonic() - t0 < 2.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_overloaded_with_a_small_queue_and_cancelling_queued_requests(engine_args):
    with Worker("--max-batch", "1", "--max-queue", "2", *engine_args, env=LONG) as w:
        w.send(
            *[{"id": f"r{i}", "prompt": f"{PROMPT} {i}", "max_tokens": 1500} for i in range(6)],
            {"op": "stats"},
        )
        for i in (3, 4, 5):
            e = w.terminal(f"r{i}")
            assert e["type"] == "error" and e["code"] == "overloaded"
        s = w.wait_for(lambda m: m["type"] == "stats")
        assert s["in_flight"] == 1 and s["queued"] == 2
        w.send({"op": "cancel", "id": "r2"})
        d = w.terminal("r2")
        assert d["finish_reason"] == "cancelled" and d["text"] == "" and d["usage"]["completion_tokens"] == 0
        assert d["timing"]["ttft_ms"] is None
        # A slot frees when r0 is cancelled: r1 starts and produces text.
        w.send({"op": "cancel", "id": "r0"})
        assert w.terminal("r0")["finish_reason"] == "cancelled"
        w.send({"id": "r6", "prompt": PROMPT, "max_tokens": 3})
        w.send({"op": "cancel", "id": "r1"})
        assert w.terminal("r1")["finish_reason"] == "cancelled"
        d6 = w.terminal("r6")
        assert d6["type"] == "done" and d6["timing"]["queue_ms"] >= 0


PARENT = r"""
import os, subprocess, sys, time
stdin_fd, stdout_fd = int(sys.argv[1]), int(sys.argv[2])
p = subprocess.Popen(sys.argv[3:], stdin=stdin_fd, stdout=stdout_fd, pass_fds=())
print(p.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["prctl", "watcher"])
def test_worker_exits_within_2s_when_its_parent_dies(how):
    """The worker's stdin and stdout stay open (the test holds them), yet killing its parent
    makes it exit: through PR_SET_PDEATHSIG (Linux), or with WORKER_PARENT_WATCH=poll turning
    that off, as on macOS, through the getppid watcher alone."""
    if how == "prctl" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    ensure_tiny_model()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    env = worker_env({"WORKER_PARENT_WATCH": "poll"} if how == "watcher" else None)
    cmd = [
        sys.executable,
        "-c",
        PARENT,
        str(in_r),
        str(out_w),
        sys.executable,
        "-m",
        "worker",
        "--model",
        str(TINY),
    ]
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env=env, pass_fds=(in_r, out_w))
    os.close(in_r)
    worker_pid = None
    try:
        worker_pid = int(parent.stdout.readline())
        with os.fdopen(out_r, "rb") as out:
            assert json.loads(out.readline())["type"] == "ready"
            parent.kill()
            parent.wait()
            died = time.monotonic()
            while not _gone(worker_pid) and time.monotonic() - died < 5:
                time.sleep(0.02)
            took = time.monotonic() - died
            assert _gone(worker_pid), "the worker outlived its parent by 5 s"
            assert took < 2.0, f"the worker took {took:.2f} s to exit after its parent died"
    finally:
        os.close(in_w)
        os.close(out_w)
        if parent.poll() is None:
            parent.kill()
        if worker_pid and not _gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)


def _gone(pid):
    """Exited, or a zombie waiting for a parent that is gone."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_backpressure_stops_reading_stdin_when_stdout_is_not_read():
    proc = spawn_raw(LONG, stderr=subprocess.DEVNULL)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        for i in range(4):
            proc.stdin.write(b'{"id":"b%d","prompt":"x","max_tokens":2000,"stream":true}\n' % i)
        proc.stdin.flush()
        time.sleep(1.0)
        # Now flood stdin with pings while nobody reads stdout.
        fd = proc.stdin.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        batch = b"".join(b'{"op":"ping","id":"p%05d"}\n' % i for i in range(100))  # < PIPE_BUF: atomic
        sent = 0
        stalled_since = None
        while sent < 16 << 20:
            try:
                os.write(fd, batch)
                sent += 100
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.0:
                    break
                time.sleep(0.01)
        sent_bytes = sent * len(batch) // 100
        assert sent_bytes < 2 << 20, f"the worker kept reading stdin: {sent_bytes} bytes taken"
        rss = _rss(proc.pid)
        # Drain: every ping gets its pong, every stream its terminal message.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        import threading

        lines = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        proc.stdin.write(b"".join(b'{"op":"cancel","id":"b%d"}\n' % i for i in range(4)))
        proc.stdin.close()
        assert proc.wait(60) == 0
        reader.join(10)
        msgs = [json.loads(line) for line in lines]
        pongs = [m for m in msgs if m["type"] == "pong"]
        assert len(pongs) == sent
        assert sorted(m["id"] for m in msgs if m["type"] == "done") == ["b0", "b1", "b2", "b3"]
        assert rss < 1 << 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rss(pid):
    return psutil.Process(pid).memory_info().rss


def test_bad_command_line_and_missing_adapter_fail_clearly(tmp_path):
    env = worker_env()
    proc = subprocess.run(
        [sys.executable, "-m", "worker"], cwd=ROOT, capture_output=True, env=env, timeout=60
    )
    assert proc.returncode == 2 and b"--model" in proc.stderr and proc.stdout == b""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--adapter", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        env=env,
        timeout=60,
        input=b"",
    )
    assert proc.returncode == 2 and b"adapter folder not found" in proc.stderr and proc.stdout == b""


def test_closed_stdout_makes_the_worker_exit():
    """The parent closed its end of stdout (EPIPE on the next write): exit at once."""
    proc = spawn_raw(LONG, stderr=subprocess.PIPE)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        proc.stdout.close()
        proc.stdin.write(b'{"id":"e1","prompt":"x","max_tokens":2000,"stream":true}\n')
        proc.stdin.flush()
        assert proc.wait(10) == 0
        assert b"stdout closed" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_soak_concurrent_streams_cancels_garbage_then_eof(engine_args):
    """36 concurrent requests (half streaming, some sampled, some with stops), garbage lines
    and cancels, then stdin closes: each id is answered exactly once, and the worker exits 0."""
    import random

    rnd = random.Random(11)
    with Worker("--max-batch", "16", *engine_args) as w:
        ids = [f"k{i}" for i in range(36)]
        lines = []
        for i, rid in enumerate(ids):
            req = {
                "id": rid,
                "prompt": f"Pergunta {i}: {PROMPT}",
                "max_tokens": rnd.randrange(5, 120),
                "stream": i % 2 == 0,
            }
            if i % 3 == 0:
                req.update(temperature=1.0, seed=i)
            if i % 4 == 0:
                req["stop"] = [".", "Farense"]
            lines.append(req)
            if i % 4 == 1:
                lines.append(b"{not json %d" % i)
            if i % 6 == 5:
                lines.append({"op": "cancel", "id": ids[i - 3]})
        lines.append({"op": "cancel", "id": "k35"})
        w.send(*lines)
        w.close_stdin()
        assert w.wait_exit(120) == 0
        w._out.join(10)
        for rid in ids:
            msgs = w.for_id(rid)
            terminals = [m for m in msgs if m["type"] in ("done", "error")]
            assert len(terminals) == 1 and msgs[-1] is terminals[0], (rid, msgs[-2:])
            assert terminals[0]["type"] == "done", terminals[0]
            text = "".join(m["text"] for m in msgs if m["type"] == "token")
            assert text == (terminals[0]["text"] if int(rid[1:]) % 2 == 0 else "")
        errors = [m for m in w.messages if m["type"] == "error"]
        assert len(errors) == 9 and all(e["code"] == "bad_json" and e["id"] is None for e in errors)
        assert any(w.terminal(r)["finish_reason"] == "cancelled" for r in ids)
