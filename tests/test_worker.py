"""The worker (python -m worker) on models/tiny-mistral, through its real stdin/stdout.

Every stdout line is validated against docs/protocol.schema.json by the harness.
Two shared workers: `w` (plain) and `lw` (long: WORKER_TEST_IGNORE_EOS, the fault and print
test hooks), so generations can run long enough to be cancelled or duplicated mid-flight.
"""

import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import ROOT, TINY, Worker  # noqa: E402

from worker import protocol  # noqa: E402

# PROMPT: the tiny model's greedy answer is long (> 40 characters) and ends by end-of-sequence.
PROMPT = "Onde fica Faro e o clube?"
OTHER = "Fala-me do Farense e de Faro."
# The tiny model's window is 32768 tokens; the context tests use 2048 (fast prefill).
CONTEXT_2048 = ("--context-length", "2048")
LONG_ENV = {"WORKER_TEST_IGNORE_EOS": "1", "WORKER_TEST_FAULT": "BOOM", "WORKER_TEST_PRINT": "1"}


@pytest.fixture(scope="module")
def w(engine_args):
    worker = Worker(*CONTEXT_2048, *engine_args)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def lw(engine_args):
    worker = Worker(*CONTEXT_2048, *engine_args, env=LONG_ENV)
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def base_text(w):
    return w.request("base", prompt=PROMPT, max_tokens=80)["text"]


def streamed(worker, rid):
    """(token texts, done message), checking the order: every token before the done."""
    done = worker.terminal(rid)
    msgs = worker.for_id(rid)
    assert msgs[-1] is done and all(m["type"] == "token" for m in msgs[:-1])
    return [m["text"] for m in msgs[:-1]], done


# ------------------------------------------------------------------ basics
def test_ready_is_first_and_describes_the_worker(w):
    r = w.ready
    assert w.messages[0] is r
    assert r["protocol"] == protocol.PROTOCOL_VERSION and r["pid"] == w.proc.pid
    assert r["model"].endswith("tiny-mistral") and r["adapter"] is None
    assert r["max_tokens"] == 256 and r["max_tokens_cap"] == 2048
    assert r["max_line_bytes"] == 1 << 20 and r["context_length"] == 2048
    assert r["backend"] == "cpu" and r["version"].startswith("worker/1")


def test_prompt_and_messages_are_the_same_request(w, base_text):
    a = w.request("pm1", prompt=PROMPT, max_tokens=80)
    b = w.request("pm2", messages=[{"role": "user", "content": PROMPT}], max_tokens=80)
    assert a["text"] == b["text"] == base_text
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"] > 5
    assert a["finish_reason"] == "stop" and a["usage"]["completion_tokens"] > 3
    t = a["timing"]
    assert t["ttft_ms"] is not None and t["ttft_ms"] <= t["total_ms"] and t["tokens_per_s"] > 0


def test_stream_tokens_concatenate_to_the_done_text(w, base_text):
    w.send({"id": "st", "prompt": PROMPT, "max_tokens": 80, "stream": True})
    tokens, done = streamed(w, "st")
    assert len(tokens) > 3 and all(tokens)
    assert "".join(tokens) == done["text"] == base_text
    assert not w.tokens("base")  # not streaming: no token messages


def test_max_tokens_gives_length(w, base_text):
    d = w.request("len", prompt=PROMPT, max_tokens=3, stream=True)
    assert d["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 3
    assert base_text.startswith(d["text"]) and d["text"]
    assert "".join(w.tokens("len")) == d["text"]


def test_max_tokens_is_capped(w):
    # 10**9 is capped by max_tokens_cap (2048) and the context; the greedy answer ends first.
    d = w.request("cap", prompt=PROMPT, max_tokens=10**9)
    assert d["finish_reason"] == "stop"


def check_stop(w, rid, stop, base_text):
    stops = [stop] if isinstance(stop, str) else stop
    w.send({"id": rid, "prompt": PROMPT, "max_tokens": 80, "stop": stop, "stream": True})
    tokens, done = streamed(w, rid)
    cut = min((base_text.find(s) for s in stops if s in base_text), default=-1)
    expected = base_text if cut < 0 else base_text[:cut]
    assert done["text"] == expected, (stop, done["text"])
    assert "".join(tokens) == done["text"]
    for s in stops:
        assert s not in done["text"]
    if cut >= 0:
        assert done["finish_reason"] == "stop"
    return done


def test_stop_strings(w, base_text):
    assert len(base_text) > 40
    mid = len(base_text) // 2
    # A phrase in the middle (several tokens), a piece starting inside a token, one character.
    check_stop(w, "stop1", base_text[mid : mid + 12], base_text)
    word_inner = next(
        i for i in range(5, len(base_text)) if base_text[i - 1].isalpha() and base_text[i].isalpha()
    )
    check_stop(w, "stop2", base_text[word_inner : word_inner + 4], base_text)
    check_stop(w, "stop3", base_text[mid], base_text)
    # Several: the earliest occurrence wins, whichever string it is.
    check_stop(w, "stop4", ["ZZZ-never", base_text[mid : mid + 5], base_text[8:14]], base_text)
    # Never completed: text unchanged, also when its beginning matches the end of the text.
    d = check_stop(w, "stop5", ["never-there", base_text[-3:] + "@@@"], base_text)
    assert d["finish_reason"] == "stop" and d["text"] == base_text


def test_stop_string_at_the_very_start(w, base_text):
    d = check_stop(w, "stop6", base_text[:3], base_text)
    assert d["text"] == "" and d["finish_reason"] == "stop"


def test_seed_makes_sampling_reproducible(w):
    req = {"prompt": PROMPT, "temperature": 1.0, "top_p": 0.95, "max_tokens": 30}
    a = w.request("seed1", seed=1234, **req)["text"]
    b = w.request("seed2", seed=1234, **req)["text"]
    assert a == b and a
    others = {w.request(f"seed-o{i}", seed=i, **req)["text"] for i in range(4)}
    assert len(others | {a}) > 1  # different seeds: different samples
    # Concurrently with other sampled and greedy requests, the seeded one is unchanged.
    w.send(
        {"id": "seed3", "seed": 1234, **req},
        {"id": "seed-n1", "prompt": OTHER, "temperature": 1.0, "max_tokens": 30},
        {"id": "seed-n2", "prompt": OTHER, "max_tokens": 30},
    )
    assert w.terminal("seed3")["text"] == a
    w.terminal("seed-n1"), w.terminal("seed-n2")


def test_sampling_options_are_accepted(w):
    d = w.request(
        "opts",
        prompt=PROMPT,
        temperature=0.8,
        top_k=5,
        min_p=0.05,
        top_p=0.9,
        repetition_penalty=1.3,
        max_tokens=20,
    )
    assert d["type"] == "done" and d["usage"]["completion_tokens"] >= 1
    d = w.request("opts2", prompt=PROMPT, temperature=0.8, top_k=5000, max_tokens=5)  # top_k >= vocab: off
    assert d["type"] == "done"


def test_repetition_penalty_changes_greedy_text(w, base_text):
    d = w.request("rep", prompt=PROMPT, repetition_penalty=2.0, max_tokens=80)
    assert d["type"] == "done" and d["text"] != base_text


def test_greedy_is_deterministic_alone_and_batched(w, base_text):
    assert w.request("g0", prompt=PROMPT, max_tokens=80)["text"] == base_text
    w.send(
        *[{"id": f"g{i}", "prompt": PROMPT, "max_tokens": 80, "stream": i % 2 == 0} for i in range(1, 5)],
        {"id": "g-other", "prompt": OTHER, "max_tokens": 50, "temperature": 0.9},
    )
    texts = [w.terminal(f"g{i}")["text"] for i in range(1, 5)]
    assert texts == [base_text] * 4


# ------------------------------------------------------------------ errors
def test_bad_json(w):
    mark = w.mark()
    w.send(b'{"id": "x", "prompt": ')
    e = w.error_after(mark)
    assert e["code"] == "bad_json" and e["id"] is None and "invalid JSON" in e["message"]
    mark = w.mark()
    w.send(b"[1,2,3]")
    e = w.error_after(mark)
    assert e["code"] == "bad_json" and "object" in e["message"]


@pytest.mark.parametrize(
    "fields, rid, name",
    [
        ({"id": "iv1", "prompt": "x", "colour": "green"}, "iv1", "colour"),
        ({"id": "iv2", "prompt": "x", "temperature": -1}, "iv2", "temperature"),
        ({"id": "iv3", "messages": [{"role": "user"}]}, "iv3", "messages[0].content"),
        ({"id": "iv4"}, "iv4", "messages"),
        ({"prompt": "no id"}, None, "id"),
        ({"id": 7, "prompt": "x"}, None, "id"),
        ({"op": "cancel"}, None, "id"),
        ({"op": "launch"}, None, "op"),
    ],
)
def test_invalid_request_names_the_field(w, fields, rid, name):
    mark = w.mark()
    w.send(fields)
    e = w.error_after(mark)
    assert e["code"] == "invalid_request" and e["id"] == rid
    assert e["message"].startswith(name + ":"), e["message"]


def test_template_rejection_is_invalid_request(w):
    # The tiny model's Mistral template requires alternating user/assistant turns.
    e = w.request("tmpl", messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert e["type"] == "error" and e["code"] == "invalid_request" and e["message"].startswith("messages")


def test_too_long(w):
    e = w.request("long", prompt="Farense " * 3000)
    assert e["type"] == "error" and e["code"] == "too_long"
    assert w.request("after-long", prompt=PROMPT, max_tokens=2)["type"] == "done"


def test_context_edge(w):
    # "Farense Farense ..." (n words) is n + 4 tokens with the tiny model's template.
    probe = w.request("edge0", prompt=" ".join(["Farense"] * 10), max_tokens=1)
    overhead = probe["usage"]["prompt_tokens"] - 10
    n = 2048 - 1 - overhead  # the prompt leaves room for exactly 1 token
    d = w.request("edge1", prompt=" ".join(["Farense"] * n), max_tokens=50)
    assert d["type"] == "done" and d["usage"]["prompt_tokens"] == 2047
    assert d["usage"]["completion_tokens"] <= 1 and d["finish_reason"] in ("length", "stop")
    e = w.request("edge2", prompt=" ".join(["Farense"] * (n + 1)), max_tokens=50)
    assert e["type"] == "error" and e["code"] == "too_long"


def test_ping_and_pong(w):
    assert w.ping("p1") == {"type": "pong", "id": "p1"}
    mark = w.mark()
    w.send({"op": "ping"})
    assert w.wait_for(lambda m: m["type"] == "pong", start=mark) == {"type": "pong", "id": None}


def test_stats(w):
    w.request("for-stats", prompt=PROMPT, max_tokens=5)
    s = w.stats()
    for key in (
        "in_flight",
        "queued",
        "served",
        "errors",
        "tokens_per_s",
        "prefix_cache",
        "memory",
        "uptime_s",
    ):
        assert key in s
    assert s["in_flight"] == 0 and s["queued"] == 0 and s["served"] >= 1 and s["tokens_per_s"] > 0
    budget = w.ready["limits"]["prefix_cache_bytes"]  # chosen by worker/limits.py
    assert s["prefix_cache"]["budget_bytes"] == budget > 0
    assert s["prefix_cache"]["hits"] + s["prefix_cache"]["misses"] >= 1
    assert s["prefix_cache"]["entries"] >= 1 and 0 < s["prefix_cache"]["bytes"] <= budget
    assert (
        s["memory"]["rss_bytes"] > 10 << 20 and s["memory"]["peak_bytes"] >= s["memory"]["active_bytes"] > 0
    )
    assert s["uptime_s"] > 0


def test_cancel_unknown_id_is_ignored(w):
    mark = w.mark()
    w.send({"op": "cancel", "id": "never-sent"})
    w.ping("after-cancel")
    assert not [m for m in w.messages[mark:] if m.get("id") == "never-sent" or m["type"] == "error"]
    w.wait_for_stderr("never-sent")


def test_cancel_finished_id_is_ignored(w):
    w.request("fin", prompt=PROMPT, max_tokens=2)
    mark = w.mark()
    w.send({"op": "cancel", "id": "fin"})
    w.ping("after-fin")
    assert not [m for m in w.messages[mark:] if m.get("id") == "fin"]


# ------------------------------------------------------------------ prefix cache
SYSTEM = (
    "És o assistente do Sporting Clube Farense, clube de futebol de Faro fundado em 1910. "
    "Responde em português europeu, com frases curtas e factos verificáveis. "
) * 12


def test_prefix_cache_reuses_a_long_system_prompt(w, engine_args):
    msgs = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]  # noqa: E731
    first = w.request("pc1", messages=msgs("Qual é o estádio?"), max_tokens=40)
    assert first["type"] == "done" and first["usage"]["prompt_tokens"] > 500
    second = w.request("pc2", messages=msgs(PROMPT), max_tokens=40)
    assert second["usage"]["cached_tokens"] > 500, second
    # The same answer as a worker of the same engine without a prefix cache (uncached, greedy).
    # (It used to be the mlx engine's, whichever engine served: llama.cpp's f16 GGUF of the tiny
    # model was then held to float32 mlx's answer, and went another way after 99 characters.)
    with Worker(*CONTEXT_2048, *engine_args, "--prefix-cache-bytes", "0") as fresh:
        ref = fresh.request("pc2", messages=msgs(PROMPT), max_tokens=40)
        assert ref["usage"]["cached_tokens"] == 0
        assert fresh.stats()["prefix_cache"]["entries"] == 0
    assert second["text"] == ref["text"]
    # An exact repeat is served from the cache too, with the same text on mlx.
    third = w.request("pc3", messages=msgs(PROMPT), max_tokens=40)
    assert third["usage"]["cached_tokens"] >= second["usage"]["prompt_tokens"] - 1
    if not engine_args:
        assert third["text"] == ref["text"]
    # llama.cpp: not the same text by construction. Its last prompt token then goes through
    # llama_decode alone, on another kernel than inside a batch, and the rounding differs: the
    # tiny model's answer went another way after 99 characters (2026-12-06).
    assert third["timing"]["ttft_ms"] < first["timing"]["ttft_ms"]


# ------------------------------------------------------------------ the long worker
def test_duplicate_id_first_continues(lw):
    lw.send(
        {"id": "dup", "prompt": PROMPT, "max_tokens": 400, "stream": True},
        {"id": "dup", "prompt": "second", "max_tokens": 5},
    )
    e = lw.wait_for(lambda m: m.get("id") == "dup" and m["type"] == "error")
    assert e["code"] == "duplicate_id"
    done = lw.wait_for(lambda m: m.get("id") == "dup" and m["type"] == "done")
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 400
    assert "".join(lw.tokens("dup")) == done["text"]
    # An invalid request reusing an in-flight id is a duplicate too (never an error for the first).
    lw.send({"id": "dup2", "prompt": PROMPT, "max_tokens": 300}, {"id": "dup2", "prompt": 5})
    e = lw.wait_for(lambda m: m.get("id") == "dup2" and m["type"] == "error")
    assert e["code"] == "duplicate_id"
    assert lw.wait_for(lambda m: m.get("id") == "dup2" and m["type"] == "done")["finish_reason"] == "length"
    # Once finished, the id can be used again.
    assert lw.request("dup", prompt=PROMPT, max_tokens=2)["type"] == "done"


def test_cancel_mid_stream(lw):
    lw.send({"id": "cx", "prompt": PROMPT, "max_tokens": 2000, "stream": True})
    lw.wait_for(lambda m: m.get("id") == "cx" and m["type"] == "token")
    time.sleep(0.05)
    lw.send({"op": "cancel", "id": "cx"})
    done = lw.terminal("cx")
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert 1 <= done["usage"]["completion_tokens"] < 2000
    assert done["text"] and "".join(lw.tokens("cx")) == done["text"]
    assert done["timing"]["ttft_ms"] is not None
    # Cancelling it again is ignored; the worker still serves.
    lw.send({"op": "cancel", "id": "cx"})
    assert lw.request("after-cx", prompt=PROMPT, max_tokens=3)["type"] == "done"
    assert len([m for m in lw.for_id("cx") if m["type"] in ("done", "error")]) == 1


def test_internal_error_is_per_request(lw):
    lw.send(
        {"id": "ok-1", "prompt": PROMPT, "max_tokens": 200, "stream": True},
        {"id": "boom", "prompt": "BOOM please", "max_tokens": 50},
        {"id": "ok-2", "prompt": OTHER, "max_tokens": 30},
    )
    e = lw.terminal("boom")
    assert e["type"] == "error" and e["code"] == "internal" and "test fault" in e["message"]
    for rid, n in (("ok-1", 200), ("ok-2", 30)):
        d = lw.terminal(rid)
        assert d["type"] == "done" and d["usage"]["completion_tokens"] == n
    assert lw.stats()["errors"] >= 1


def test_stdout_stays_clean_when_libraries_print(lw):
    """WORKER_TEST_PRINT makes every admission print() and write to fd 1; the harness
    validates every stdout line, and the prints must show up on stderr instead."""
    assert lw.request("noisy", prompt=PROMPT, max_tokens=3)["type"] == "done"
    # The lines for 'noisy' (earlier requests to this worker printed theirs too)
    lw.wait_for_stderr("print() to sys.stdout while admitting 'noisy'")
    lw.wait_for_stderr("raw write to fd 1")
    assert not lw.violations


def test_too_large_line_then_still_serving(lw):
    mark = lw.mark()
    big = b'{"id":"big","prompt":"' + b"a" * (2 << 20) + b'"}\n'
    lw.send_raw(big[:700_000])
    lw.send_raw(big[700_000:])
    e = lw.error_after(mark)
    assert e["code"] == "too_large" and e["id"] is None
    assert lw.request("after-big", prompt=PROMPT, max_tokens=3)["type"] == "done"
    # A line just under the limit is parsed normally.
    almost = b'{"id":"almost","prompt":"x","pad":"' + b"b" * ((1 << 20) - 100) + b'"}'
    assert len(almost) <= 1 << 20
    mark = lw.mark()
    lw.send(almost)
    e = lw.error_after(mark)
    assert e["code"] == "invalid_request" and e["id"] == "almost" and e["message"].startswith("pad:")


def _malformed_lines(n, seed=7):
    rnd = random.Random(seed)
    makers = [
        lambda i: bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 60))),
        lambda i: b'{"id":"m%d","prompt":' % i,
        lambda i: b'{"id":"m%d","prompt":"x","nope":%d}' % (i, i),
        lambda i: b'{"id":"m%d","prompt":"x","temperature":-%d}' % (i, i + 1),
        lambda i: b'{"id":"m%d","messages":[{"role":"bot","content":"x"}]}' % i,
        lambda i: b"[" * (40 + i % 50) + b"]" * (40 + i % 50),
        lambda i: b'{"id":"m%d","prompt":"x","k":%s}' % (i, b"[" * 40 + b"]" * 40),
        lambda i: b'{"id":"m%d","prompt":"\\ud800"}' % i,
        lambda i: b'{"id":"m%d","prompt":"a\x00b"}' % i,
        lambda i: b'\x00\x00{"op":"ping"}',
        lambda i: b'{"op":"cancel","id":""}',
        lambda i: b'{"id":"m%d","prompt":"x","max_tokens":1e400}' % i,
        lambda i: b'{"id":%d,"prompt":"x"}' % i,
        lambda i: b'{"id":"m%d","prompt":"\xc3"}' % i,
        lambda i: b"null",
        lambda i: b'"\xed\xa0\x80"',
    ]
    lines = []
    i = 0
    while len(lines) < n:
        line = makers[i % len(makers)](i).replace(b"\n", b" ").replace(b"\r", b" ")
        i += 1
        result = protocol.parse_line(line)
        if isinstance(result, protocol.ParseError):
            lines.append((line, result.code))
    return lines


def test_fuzz_the_running_worker_with_malformed_lines(lw):
    lines = _malformed_lines(2000)
    mark = lw.mark()
    lw.send_raw(b"".join(line + b"\n" for line, _ in lines))
    ok = lw.request("after-fuzz", prompt=PROMPT, max_tokens=3)
    assert ok["type"] == "done"
    with lw.cond:
        errors = [m for m in lw.messages[mark:] if m["type"] == "error"]
    assert [e["code"] for e in errors] == [code for _, code in lines]
    assert lw.ping("after-fuzz-ping")["type"] == "pong"


def test_many_concurrent_requests_are_each_answered_once(lw):
    rnd = random.Random(3)
    ids = [f"cc{i}" for i in range(36)]
    lines = []
    for i, rid in enumerate(ids):
        req = {
            "id": rid,
            "prompt": f"Pergunta {i}: {PROMPT}",
            "max_tokens": rnd.randrange(5, 80),
            "stream": i % 2 == 0,
        }
        if i % 3 == 0:
            req.update(temperature=0.9, seed=i)
        if i % 7 == 0:
            req["stop"] = ["ZZ", "\n\n"]
        lines.append(req)
        if i % 5 == 0:
            lines.append(b"garbage %d" % i)
    lw.send(*lines)
    for rid in ids[::6]:
        lw.send({"op": "cancel", "id": rid})
    for rid in ids:
        lw.terminal(rid, timeout=120)
    for rid in ids:
        msgs = lw.for_id(rid)
        terminals = [m for m in msgs if m["type"] in ("done", "error")]
        assert len(terminals) == 1 and msgs[-1] is terminals[0], rid
        streamed_text = "".join(m["text"] for m in msgs if m["type"] == "token")
        if terminals[0]["type"] == "done" and int(rid[2:]) % 2 == 0:
            assert streamed_text == terminals[0]["text"], rid
        else:
            assert streamed_text == "", rid
    s = lw.stats()
    assert s["in_flight"] == 0 and s["queued"] == 0


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="an optimised BLAS is loaded on Linux only (reads /proc/PID/maps)",
)
def test_fast_blas_is_loaded_in_the_worker(w):
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    if "libopenblas.so.0" not in listing and "libmkl_rt" not in listing:
        pytest.skip("no OpenBLAS/MKL installed (ldconfig -p shows no libopenblas.so.0)")
    maps = Path(f"/proc/{w.proc.pid}/maps").read_text()
    assert "openblas" in maps or "mkl" in maps
    assert w.ready["blas"] and ("openblas" in w.ready["blas"] or "mkl" in w.ready["blas"])


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/PID/fd (Linux) to see where fd 1 points"
)
def test_sys_stdout_is_not_the_protocol_pipe(w):
    # fd 1 of the worker points where fd 2 does (stderr), not at the protocol pipe.
    fd1 = Path(f"/proc/{w.proc.pid}/fd/1").resolve()
    fd2 = Path(f"/proc/{w.proc.pid}/fd/2").resolve()
    assert fd1 == fd2


def test_cli_prints_one_json_result():
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", PROMPT, "--model", str(TINY), "--max-tokens", "12"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "FAST_BLAS_QUIET": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    import json

    result = json.loads(lines[0])
    assert result["text"] and result["finish_reason"] in ("stop", "length")
    assert result["usage"]["completion_tokens"] <= 12 and result["model"].endswith("tiny-mistral")
