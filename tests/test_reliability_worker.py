"""Reliability of the worker (python -m worker) under load, hostile input and a failing parent.

GitHub issue #7. Everything runs the real worker on models/tiny-mistral through
tests/worker_harness.py, which schema-validates every stdout line.

- soak: requests through one worker (random cancels, garbage lines, streaming and not, at
  most 16 outstanding as a parent would keep): every id answered exactly once, resident
  memory flat after warm-up, the prefix cache within its (small) byte budget and really
  evicting (a short run, in `make test`); and 5,000 chatbot requests through bench/soak.py
  with a 64 MiB budget against a 0-budget baseline: the budget bounds the memory (slow).
- fuzzing: the parser (hypothesis: lone surrogate escapes, NUL bytes, byte mutations against
  Python's json as an oracle, schema-valid requests; atheris when installed) and the live
  worker (tests/fuzz_corpus/, one nasty line per file, plus hypothesis-made lines).
- sampling extremes: valid but extreme sampling values still sample from the filtered set.
- parent faults: the parent killed with SIGKILL (the worker exits within 2 s, no orphan); a
  parent that stops reading stdout (the worker stops reading stdin, memory stays flat, and
  every request is answered once the parent reads again).

Figures from the last run are in docs/RELIABILITY.md; tests print theirs (pytest -s).
"""

import ctypes
import fcntl
import itertools
import json
import os
import random
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import (  # noqa: E402
    REQUEST_VALIDATOR,
    ROOT,
    TINY,
    VALIDATOR,
    Worker,
    ensure_tiny_model,
    spawn_raw,
    worker_env,
)

from worker import protocol  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
PROMPT = "Quando foi fundado o Farense?"
LONG = {"WORKER_TEST_IGNORE_EOS": "1"}
TERMINAL = ("done", "error")


def report(**figures):
    """One line with the figures docs/RELIABILITY.md quotes (visible with pytest -s)."""
    print("\nRELIABILITY " + json.dumps(figures, sort_keys=True), flush=True)


def rss(pid):
    return psutil.Process(pid).memory_info().rss


# =====================================================================================
# soak
# =====================================================================================
SYSTEMS = [
    None,
    "És o assistente do Sporting Clube Farense. Responde em português europeu.",
    (
        "És o assistente do Sporting Clube Farense, clube de futebol de Faro fundado em 1910. "
        "Responde com frases curtas e factos verificáveis. "
    )
    * 6,
    (
        "Responde sempre com uma única frase sobre o Farense, o Estádio de São Luís e a cidade "
        "de Faro, no Algarve. "
    )
    * 10,
]
QUESTIONS = [
    PROMPT,
    "Qual é o estádio do Farense?",
    "Onde fica Faro?",
    "Quem são os adeptos do Farense?",
    "Quais são as cores do clube?",
    "Como se chama a mascote?",
    "Em que divisão joga o Farense?",
    "Qual é a capacidade do Estádio de São Luís?",
    "Quem foi o melhor marcador?",
    "Como comprar bilhetes?",
    "Onde treina a equipa?",
    "Qual é a alcunha do clube?",
    "Conta a história do Farense.",
    "O que é o Algarve?",
    "Quando joga o Farense?",
    "Olá!",
    "Obrigado.",
    "Qual é o site oficial?",
    "Há escolas de futebol?",
    "Quem é o treinador?",
]
GARBAGE = [
    b"{not json",
    b'{"id": "g", "prompt": ',
    b'{"op": "nope"}',
    b'{"prompt": "no id"}',
    b"\xff\xfe\xfd",
    b'{"id": "g", "prompt": "\\ud800"}',
    b"[1, 2, 3]",
    b'{"id": 7, "prompt": "x"}',
    b'\x00{"op": "ping"}',
    b"[" * 200 + b"]" * 200,
]


def _soak_request(rnd, i):
    # The first 32: the longest prompts and generations, 16 at a time, so the warm-up sees the
    # largest shapes early (mlx keeps freed buffers per size for reuse).
    system = rnd.choice(SYSTEMS[2:] if i < 32 else SYSTEMS)
    question = rnd.choice(QUESTIONS)
    if rnd.random() < 0.3:
        question = f"{question} ({i})"  # a prompt never seen before
    req = {"id": f"s{i}", "max_tokens": 12 if i < 32 else rnd.randint(1, 12), "stream": rnd.random() < 0.5}
    if system is None and rnd.random() < 0.5:
        req["prompt"] = question
    else:
        req["messages"] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
    r = rnd.random()
    if r < 0.3:
        req.update(temperature=0.8, seed=rnd.randrange(1 << 31))
    elif r < 0.4:
        req.update(temperature=1.0, top_p=0.9, top_k=20)
    if rnd.random() < 0.1:
        req["stop"] = [".", "Farense"]
    return req


def soak(n, seed, max_outstanding=16, budget=1 << 20, max_growth=0.10):
    """Drive n requests through one worker; returns the figures and does every check."""
    rnd = random.Random(seed)
    for line in GARBAGE:
        r = protocol.parse_line(line)
        assert isinstance(r, protocol.ParseError) and r.id is None, line
    w = Worker("--prefix-cache-bytes", budget)
    try:
        pid = w.proc.pid
        outstanding = {}  # id -> request
        answered = {}  # id -> terminal message
        requests = {}
        garbage_sent = 0
        cancels_sent = 0
        stats = []
        pos = 0
        i = 0
        warm_at = max(n // 3, 150)  # every batch size and prompt shape seen by then
        sample_every = 3
        fds_warm = None
        rss_warmup, rss_samples = [], []  # RSS under load: during and after the warm-up
        t0 = time.monotonic()
        while i < n or outstanding:
            lines = []
            while i < n and len(outstanding) < max_outstanding:
                req = _soak_request(rnd, i)
                requests[req["id"]] = req
                outstanding[req["id"]] = req
                lines.append(req)
                i += 1
                r = rnd.random()
                if r < 0.05:
                    lines.append(rnd.choice(GARBAGE))
                    garbage_sent += 1
                if r < 0.12:
                    # cancel something in flight (it may finish first: then it is ignored)
                    lines.append({"op": "cancel", "id": rnd.choice(list(outstanding))})
                    cancels_sent += 1
                elif r < 0.14 and answered:
                    lines.append({"op": "cancel", "id": rnd.choice(list(answered))})  # finished
                    cancels_sent += 1
                if i % 50 == 0:
                    lines.append({"op": "stats"})
            if lines:
                w.send(*lines)
            with w.cond:
                # a stdout message, up to 60 s in all
                w.cond.wait_for(lambda seen=pos: len(w.messages) > seen or w.stdout_closed, 60)
                new = w.messages[pos:]
                pos = len(w.messages)
            if not new and outstanding:
                assert w.proc.poll() is None, f"the worker died: {w.stderr_lines[-10:]}"
                raise AssertionError(f"no message for 60 s with {len(outstanding)} outstanding")
            for m in new:
                if m["type"] in TERMINAL and m.get("id") is not None:
                    assert m["id"] in outstanding, f"a terminal message for {m['id']!r}, not outstanding"
                    outstanding.pop(m["id"])
                    answered[m["id"]] = m
                    if len(answered) == warm_at:
                        fds_warm = psutil.Process(pid).num_fds()
                    if len(answered) % sample_every == 0:
                        (rss_samples if len(answered) > warm_at else rss_warmup).append(rss(pid))
                elif m["type"] == "stats":
                    stats.append(m)
        elapsed = time.monotonic() - t0
        final_stats = w.stats()
        stats.append(final_stats)
        rss_end = rss(pid)
        fds_end = psutil.Process(pid).num_fds()
        threads_end = psutil.Process(pid).num_threads()

        # every id exactly once, tokens before the terminal, streamed text == done text
        by_id = {}
        with w.cond:
            for m in w.messages:
                if m.get("id") is not None and m["type"] in ("token", "done", "error"):
                    by_id.setdefault(m["id"], []).append(m)
        assert set(answered) == set(requests) and len(answered) == n
        cancelled = 0
        for rid, req in requests.items():
            msgs = by_id[rid]
            terminals = [m for m in msgs if m["type"] in TERMINAL]
            assert len(terminals) == 1 and msgs[-1] is terminals[0], (rid, msgs[-3:])
            done = terminals[0]
            assert done["type"] == "done", done
            cancelled += done["finish_reason"] == "cancelled"
            tokens = "".join(m["text"] for m in msgs if m["type"] == "token")
            assert tokens == (done["text"] if req["stream"] else ""), rid
            assert done["usage"]["completion_tokens"] <= req["max_tokens"]
        with w.cond:
            null_errors = [m for m in w.messages if m["type"] == "error" and m["id"] is None]
        assert len(null_errors) == garbage_sent, (len(null_errors), garbage_sent)
        assert final_stats["in_flight"] == 0 and final_stats["queued"] == 0
        assert final_stats["errors"] == garbage_sent

        # the prefix cache: within budget at every sample, in use, and evicting
        caches = [s["prefix_cache"] for s in stats]
        assert all(c["budget_bytes"] == budget for c in caches)
        assert all(0 <= c["bytes"] <= budget for c in caches), [c["bytes"] for c in caches]
        assert final_stats["prefix_cache"]["hits"] > 0
        assert len({(c["entries"], c["bytes"]) for c in caches}) > 1, caches
        evicted = _prove_eviction(w, budget)

        # RSS under load swings by tens of MB (mlx keeps freed buffers per size, the allocator
        # returns memory in bursts), so single samples are noise. Compare envelopes: the highest
        # RSS of the warm-up (which starts with the largest prompts and batches) with the
        # highest of the second half after it. A leak raises the latter; swings do not.
        half = len(rss_samples) // 2
        rss_warm, rss_late = max(rss_warmup), max(rss_samples[half:])
        growth = (rss_late - rss_warm) / rss_warm
        figures = dict(
            test=f"soak_{n}",
            requests=n,
            seconds=round(elapsed, 1),
            garbage=garbage_sent,
            cancels=cancels_sent,
            cancelled=cancelled,
            rss_samples=len(rss_samples),
            rss_max_warmup_mb=round(rss_warm / 2**20, 1),
            rss_max_after_warmup_first_half_mb=round(max(rss_samples[:half]) / 2**20, 1),
            rss_max_second_half_mb=round(rss_late / 2**20, 1),
            rss_min_after_warmup_mb=round(min(rss_samples) / 2**20, 1),
            rss_idle_end_mb=round(rss_end / 2**20, 1),
            rss_growth_pct=round(growth * 100, 2),
            active_mb_end=round(final_stats["memory"]["active_bytes"] / 2**20, 1),
            peak_mb_end=round(final_stats["memory"]["peak_bytes"] / 2**20, 1),
            cache_budget=budget,
            cache_bytes_max=max(c["bytes"] for c in caches),
            cache_entries_max=max(c["entries"] for c in caches),
            cache_hits=final_stats["prefix_cache"]["hits"],
            cache_misses=final_stats["prefix_cache"]["misses"],
            fds_warm=fds_warm,
            fds_end=fds_end,
            threads_end=threads_end,
            **evicted,
        )
        report(**figures)
        assert growth < max_growth, figures  # the bounded buffer cache keeps RSS flat
        assert fds_end == fds_warm, figures  # no descriptor leaks
        w.close_stdin()
        assert w.wait_exit(60) == 0
        return figures
    finally:
        w.close()


def _prove_eviction(w, budget):
    """An exact repeat is a cache hit; after enough other prompts, the same prompt is not."""
    msgs = lambda q: [{"role": "system", "content": SYSTEMS[3]}, {"role": "user", "content": q}]  # noqa: E731
    first = w.request("ev-a1", messages=msgs("Pergunta de controlo sobre despejo"), max_tokens=2)
    again = w.request("ev-a2", messages=msgs("Pergunta de controlo sobre despejo"), max_tokens=2)
    assert again["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1, again
    # other long prompts (different from the first token of the user turn on) fill the budget
    for k in range(12):
        filler = [{"role": "user", "content": f"{k} " + SYSTEMS[2] + QUESTIONS[k]}]
        assert w.request(f"ev-f{k}", messages=filler, max_tokens=2)["type"] == "done"
        assert w.stats()["prefix_cache"]["bytes"] <= budget
    later = w.request("ev-a3", messages=msgs("Pergunta de controlo sobre despejo"), max_tokens=2)
    assert later["usage"]["cached_tokens"] < first["usage"]["prompt_tokens"] // 2, later
    return {
        "evicted_prompt_tokens": first["usage"]["prompt_tokens"],
        "cached_before_eviction": again["usage"]["cached_tokens"],
        "cached_after_eviction": later["usage"]["cached_tokens"],
    }


def test_soak_short():
    """~300 requests (in `make test`): every id answered once, the cache within its budget and
    evicting, memory flat after the warm-up."""
    soak(300, seed=20240607)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_long_the_cache_budget_holds():
    """5,000 chatbot requests (bench/soak.py: one system prompt, varied, repeated and follow-up
    questions, ~10% cancelled, garbage lines) with a 64 MiB prefix cache, which the traffic
    overfills within the first few hundred, beside the same traffic with the cache off: no
    reply lost or duplicated, no error but the garbage's, the worker's memory within the
    baseline's end + 1.1 x the budget at every checkpoint, and < 2% growth over the second
    half (before the fix: +2.5x the budget, still rising)."""
    from bench import soak, soak_driver

    args = soak.parse_args(["-n", "5000", "--budget", "64MiB", "--baseline", "--stats-every", "10"])
    result, baseline = soak.run_pair(args, soak.plan(args.requests, seed=7), soak_driver.run_stdio)
    verdict = soak.judge(result, baseline)
    report(test="soak_5000", **verdict, **{k: result[k] for k in ("seconds", "garbage_sent", "cancelled")})
    print(soak.report(result, baseline, verdict))
    for r in (result, baseline):
        assert r["lost"] == 0 and r["duplicated"] == 0 and r["late_tokens"] == 0, r["via"]
        assert soak.problems(r) == [], soak.problems(r)
        assert r["answered"] == 5000 and r["garbage_sent"] > 50 and r["cancelled"] > 200
    samples = [s for s in result["samples"] if not s.get("idle")]
    early = samples[: len(samples) // 10]
    assert max(s["counted"] for s in early) > 0.95 * args.budget  # overfilled early: evicting since
    assert all(s["counted"] <= args.budget for s in samples)
    assert samples[-1]["hits"] > 2500
    assert verdict["bound_ok"], verdict
    assert verdict["growth_ok"], verdict


# =====================================================================================
# fuzzing: the parser (hypothesis), beyond tests/test_protocol_parser.py
# =====================================================================================
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
SURROGATE_ESCAPES = st.integers(0xD800, 0xDFFF).map(lambda c: "\\u%04x" % c)
ANY_ESCAPES = st.one_of(
    SURROGATE_ESCAPES,
    st.integers(0, 0xFFFF).map(lambda c: "\\u%04x" % c),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=3).map(
        lambda s: json.dumps(s, ensure_ascii=False)[1:-1]
    ),
)
ESCAPED_STRING = st.lists(ANY_ESCAPES, min_size=1, max_size=6).map("".join)


def _has_surrogate(value):
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


@FUZZ
@given(ESCAPED_STRING, st.sampled_from(["prompt", "id", "stop", "key", "content"]))
def test_parser_json_escapes_and_lone_surrogates(escaped, where):
    """A \\uXXXX escape that leaves a lone surrogate is bad_json; anything else decodes
    exactly as Python's json does."""
    body = {
        "prompt": '{"id":"e","prompt":"%s"}',
        "id": '{"id":"%s","prompt":"x"}',
        "stop": '{"id":"e","prompt":"x","stop":["%s"]}',
        "key": '{"id":"e","prompt":"x","%s":1}',
        "content": '{"id":"e","messages":[{"role":"user","content":"%s"}]}',
    }[where] % escaped
    line = body.encode("utf-8")
    expected = json.loads(body)  # Python's json accepts lone surrogates: the oracle
    r = protocol.parse_line(line)
    if _has_surrogate(expected):
        assert isinstance(r, protocol.ParseError) and r.code == "bad_json", (body, r)
        return
    if where == "prompt":
        assert r.messages[0]["content"] == expected["prompt"]
    elif where == "content":
        assert r.messages[0]["content"] == expected["messages"][0]["content"]
    elif where == "id":
        if protocol.valid_id(expected["id"]):
            assert isinstance(r, protocol.Generate) and r.id == expected["id"]
        else:
            assert r.code == "invalid_request" and r.id is None
    elif where == "stop":
        if expected["stop"][0]:
            assert r.stop == (expected["stop"][0],)
        else:
            assert r.code == "invalid_request" and r.message.startswith("stop[0]:")
    else:
        key = next(k for k in expected if k not in ("id", "prompt"))
        if key in protocol.GENERATE_FIELDS:
            return
        assert r.code == "invalid_request" and r.id == "e"
        json.dumps(r.to_message())  # the message naming the key is printable JSON
        assert len(r.message) < 200


VALID_LINES = [
    b'{"id":"v1","prompt":"Ol\xc3\xa1","max_tokens":3}',
    b'{"id":"v2","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}],"stream":true}',
    b'{"id":"v3","prompt":"x","stop":["a","b"],"seed":5,"temperature":0.5,"top_p":0.9,"top_k":3}',
    b'{"op":"cancel","id":"v1"}',
    b'{"op":"ping"}',
]


@FUZZ
@given(st.sampled_from(VALID_LINES), st.integers(0, 200))
def test_parser_raw_nul_anywhere_is_bad_json(line, at):
    at = at % (len(line) + 1)
    r = protocol.parse_line(line[:at] + b"\x00" + line[at:])
    assert isinstance(r, protocol.ParseError) and r.code == "bad_json" and r.id is None


def _mutate(data, ops):
    data = bytearray(data)
    for kind, pos, byte in ops:
        if not data:
            break
        pos %= len(data)
        if kind == 0:
            data[pos] = byte
        elif kind == 1:
            data.insert(pos, byte)
        else:
            del data[pos]
    return bytes(data)


def _python_json(line):
    """Python's strict reading of a line (no NaN/Infinity, bounded ints), else None."""

    def no_constant(name):
        raise ValueError(name)

    def bounded_int(text):
        if len(text.lstrip("-")) > 18:
            raise ValueError("big int")
        return int(text)

    try:
        text = line.decode("utf-8")
        return json.loads(text, parse_constant=no_constant, parse_int=bounded_int)
    except (ValueError, RecursionError):
        return None


@FUZZ
@given(
    st.sampled_from(VALID_LINES),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4
    ),
)
def test_parser_byte_mutations_against_python_json(line, ops):
    """Mutated valid lines: never raises; a line Python's json rejects is bad_json; an
    accepted request holds exactly what Python's json reads (no surrogates, no NUL bytes
    outside strings)."""
    mutated = _mutate(line, ops).replace(b"\n", b" ")
    r = protocol.parse_line(mutated)
    assert r is None or isinstance(r, (protocol.Generate, protocol.Control, protocol.ParseError))
    expected = _python_json(mutated.rstrip(b"\r"))
    if expected is None or not isinstance(expected, dict):
        if mutated.strip(b" \t\r"):
            assert isinstance(r, protocol.ParseError) and r.code in ("bad_json", "invalid_request"), (
                mutated,
                r,
            )
            if expected is None and r.code == "invalid_request":
                # Python refused it but orjson read an object: only the int bound differs
                assert b"e" in mutated.lower() or any(
                    ch.isdigit() for ch in mutated.decode("utf-8", "replace")
                )
        return
    if _has_surrogate(expected):
        assert isinstance(r, protocol.ParseError) and r.code == "bad_json"
        return
    if isinstance(r, protocol.Generate):
        assert r.id == expected["id"]
        msgs = expected.get("messages") or [{"role": "user", "content": expected.get("prompt")}]
        assert [m["content"] for m in r.messages] == [m["content"] for m in msgs]
        assert not list(REQUEST_VALIDATOR.iter_errors(expected)) or any(
            isinstance(v, float) for v in expected.values()
        )
    elif isinstance(r, protocol.Control):
        assert r.op == expected["op"] and r.id == expected.get("id")


def _schema_valid_requests():
    text = st.text(max_size=12)
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": text}
    )
    optional = {
        "max_tokens": st.integers(1, 2**63),
        "temperature": st.floats(0, 1e308),
        "top_p": st.floats(1e-300, 1.0),
        "top_k": st.integers(0, 2**63),
        "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(1e-300, 1e308),
        "seed": st.integers(-(2**63), 2**63),
        "stream": st.booleans(),
        "stop": st.one_of(
            st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=16)
        ),
    }
    ident = st.text(min_size=1, max_size=128)
    generate = st.fixed_dictionaries({"id": ident}, optional={**optional, "prompt": text}).map(
        lambda d: d if "prompt" in d else d
    )
    with_messages = st.fixed_dictionaries(
        {"id": ident, "messages": st.lists(message, min_size=1, max_size=4)}, optional=optional
    )
    control = st.one_of(
        st.fixed_dictionaries({"op": st.sampled_from(["ping", "stats", "shutdown"])}, optional={"id": ident}),
        st.fixed_dictionaries({"op": st.just("cancel"), "id": ident}),
    )
    return st.one_of(generate, with_messages, control)


@FUZZ
@given(_schema_valid_requests())
def test_parser_accepts_what_the_schema_accepts(obj):
    """The converse of test_protocol_parser's check: every request the published schema
    accepts, the worker's parser accepts too (a client validating against the schema is
    never surprised)."""
    if list(REQUEST_VALIDATOR.iter_errors(obj)):
        return  # e.g. neither prompt nor messages
    line = json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    r = protocol.parse_line(line)
    if _has_surrogate(obj):
        assert isinstance(r, protocol.ParseError) and r.code == "bad_json"
        return
    assert isinstance(r, (protocol.Generate, protocol.Control)), (obj, r)


ATHERIS_TARGET = r"""
import math, sys
import atheris
with atheris.instrument_imports():
    from worker import protocol
import orjson

CODES = ("bad_json", "invalid_request", "too_large")

def check(data):
    r = protocol.parse_line(data)
    if r is None:
        assert not data.strip(b" \t\r\n")
        return
    if isinstance(r, protocol.ParseError):
        assert r.code in CODES and isinstance(r.message, str)
        assert r.id is None or protocol.valid_id(r.id)
        orjson.dumps(r.to_message())       # no lone surrogate can reach the output
        return
    if isinstance(r, protocol.Control):
        assert r.op in protocol.CONTROL_OPS and (r.id is None or protocol.valid_id(r.id))
        return
    assert isinstance(r, protocol.Generate) and protocol.valid_id(r.id)
    assert r.messages and all(m["role"] in protocol.ROLES for m in r.messages)
    orjson.dumps([r.id, r.messages, r.stop])
    assert r.seed is None or 0 <= r.seed < 2 ** 64
    for v in (r.temperature, r.top_p, r.min_p, r.repetition_penalty):
        assert v is None or math.isfinite(v)
    assert r.max_tokens is None or r.max_tokens >= 1

atheris.Setup(sys.argv, check)
atheris.Fuzz()
"""


def test_atheris_fuzzes_the_parser(tmp_path):
    """A bounded coverage-guided run (libFuzzer via atheris) seeded with tests/fuzz_corpus."""
    probe = subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("atheris is not installed (pip install atheris==3.0.0; Linux wheels only)")
    target = tmp_path / "fuzz_parser.py"
    target.write_text(ATHERIS_TARGET)
    work = tmp_path / "corpus"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(target),
            "-runs=100000",
            "-max_total_time=15",
            "-max_len=4096",
            "-rss_limit_mb=2048",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(work),
            str(CORPUS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=worker_env(),
    )
    tail = proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert "Done" in proc.stderr, tail
    runs = [line for line in proc.stderr.splitlines() if line.startswith("Done")]
    report(test="atheris", result=runs[-1] if runs else tail[-200:])


# =====================================================================================
# fuzzing the live worker
# =====================================================================================
@pytest.fixture(scope="module")
def fw():
    worker = Worker()
    yield worker
    worker.close()


def _corpus():
    return sorted(p for p in CORPUS.iterdir() if p.suffix == ".bin")


def test_the_corpus_is_one_line_per_file_with_a_known_expectation():
    files = _corpus()
    assert len(files) >= 50
    kinds = {"bad_json", "invalid_request", "too_large", "too_long", "done", "blank"}
    for f in files:
        kind = f.name.split("__", 1)[0]
        assert kind in kinds, f.name
        assert b"\n" not in f.read_bytes(), f.name
    assert {f.name.split("__", 1)[0] for f in files} == kinds


def _expectation(path):
    return path.name.split("__", 1)[0]


@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.stem)
def test_corpus_case_in_the_live_worker(fw, path):
    """Each file is one line: the worker answers it as its name says and keeps serving."""
    data = path.read_bytes()
    kind = _expectation(path)
    parsed = protocol.parse_line(data)
    if kind == "blank":
        assert parsed is None
    elif kind in ("done", "too_long"):
        assert isinstance(parsed, protocol.Generate), parsed
    elif kind != "too_large":
        assert isinstance(parsed, protocol.ParseError) and parsed.code == kind, parsed
    mark = fw.mark()
    fw.send_raw(data + b"\n")
    pong = fw.ping(f"after-{path.stem}"[:128], timeout=60)
    with fw.cond:
        before_pong = fw.messages[mark : fw.messages.index(pong)]
    if kind == "blank":
        assert before_pong == []
    elif kind in ("done", "too_long"):
        m = fw.terminal(parsed.id, timeout=60, start=mark)
        if kind == "done":
            assert m["type"] == "done" and m["finish_reason"] in ("stop", "length"), m
            if parsed.stream:
                assert "".join(fw.tokens(parsed.id)) == m["text"]
        else:
            assert m["type"] == "error" and m["code"] == "too_long" and m["id"] == parsed.id
    else:
        errors = [m for m in before_pong if m["type"] == "error"]
        assert len(before_pong) == len(errors) == 1, before_pong
        e = errors[0]
        assert e["code"] == kind, e
        if kind == "too_large":
            assert e["id"] is None
        else:
            assert e["id"] == parsed.id
            assert e["message"] == parsed.message
    assert fw.proc.poll() is None


def test_the_worker_survives_the_whole_corpus_at_once(fw):
    """All cases back to back in one write (one stdin chunk holds many of them)."""
    files = _corpus()
    mark = fw.mark()
    fw.send_raw(b"".join(f.read_bytes() + b"\n" for f in files))
    done_ids = [
        protocol.parse_line(f.read_bytes()).id for f in files if _expectation(f) in ("done", "too_long")
    ]
    pong = fw.ping("after-corpus", timeout=120)
    for rid in done_ids:
        fw.terminal(rid, timeout=120, start=mark)
    with fw.cond:
        errors = [m["code"] for m in fw.messages[mark : fw.messages.index(pong)] if m["type"] == "error"]
    want = sorted(_expectation(f) for f in files if _expectation(f) not in ("done", "blank", "too_long"))
    assert sorted(c for c in errors if c != "too_long") == want
    assert fw.stats()["in_flight"] == 0


NASTY_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(
            [
                "\x00",
                "\ud800",
                "\udfff",
                "\U0001f600",
                "\u202e",
                "\ufeff",
                "</s>",
                "[INST]",
                "\\",
                '"',
                "\r",
                "a\u0301",
                "\uffff",
            ]
        ),
        max_size=30,
    ).map("".join),
    st.integers(1, 4000).map(lambda n: "é" * n),
)
NASTY_NUMBER = st.sampled_from(
    [0, -0.0, 1, 5e-324, 1e-300, 1e-38, 0.5, 1.0, 1e30, 1e308, 2**63, 2**64, 10**30, -(10**30), -1, 1.5, 3.0]
)


@st.composite
def nasty_lines(draw):
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=200)).replace(b"\n", b" ")
    if kind == 1:
        depth = draw(st.integers(1, 3000))
        return b'{"id":"q","prompt":"x","max_tokens":1,"k":' + b"[" * depth + b"]" * depth + b"}"
    if kind == 2:
        return draw(st.sampled_from([b"1e400", b"-1e400", b"9" * 400, b"1e-400", b"-0"])).join(
            [b'{"id":"q","prompt":"x","max_tokens":', b"}"]
        )
    obj = {"id": draw(st.one_of(st.just("q"), NASTY_TEXT))}
    if draw(st.booleans()):
        obj["prompt"] = draw(NASTY_TEXT)
    else:
        obj["messages"] = [
            {
                "role": draw(st.sampled_from(["system", "user", "assistant", "bot"])),
                "content": draw(NASTY_TEXT),
            }
            for _ in range(draw(st.integers(0, 3)))
        ]
    obj["max_tokens"] = draw(st.integers(1, 4))
    for key in draw(
        st.sets(
            st.sampled_from(
                [
                    "temperature",
                    "top_p",
                    "top_k",
                    "min_p",
                    "repetition_penalty",
                    "seed",
                    "stop",
                    "stream",
                    "model",
                    "path",
                ]
            ),
            max_size=4,
        )
    ):
        obj[key] = draw(NASTY_TEXT) if key in ("stop", "model", "path") else draw(NASTY_NUMBER)
    raw = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    return raw.encode("utf-8", "surrogatepass").replace(b"\n", b" ")


_PINGS = itertools.count()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(nasty_lines())
def test_hypothesis_lines_into_the_live_worker(fw, line):
    """Each generated line gets the answer the parser predicts (an error with its code, or a
    done for a valid request), and the worker keeps serving."""
    expected = protocol.parse_line(line)
    mark = fw.mark()
    fw.send_raw(line + b"\n")
    if isinstance(expected, protocol.Generate):
        m = fw.terminal(expected.id, timeout=60, start=mark)
        assert m["type"] == "done" or m["code"] in ("too_long", "invalid_request"), m
        if m["type"] == "error" and m["code"] == "invalid_request":
            assert m["message"].startswith("messages"), m  # the chat template said no
    pong = fw.ping(f"hp-{next(_PINGS)}", timeout=60)  # a fresh id: the harness searches from 0
    if isinstance(expected, protocol.ParseError):
        with fw.cond:
            errors = [m for m in fw.messages[mark : fw.messages.index(pong)] if m["type"] == "error"]
        assert [(e["code"], e["id"]) for e in errors] == [(expected.code, expected.id)]


# =====================================================================================
# sampling extremes: valid values, still a sample from the filtered distribution
# =====================================================================================
@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 5e-324},
        {"temperature": 1e-300},
        {"temperature": 1e-300, "seed": 1},
        {"temperature": 1e308, "top_k": 1},
        {"temperature": 1e308, "top_k": 1, "seed": 2},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1.0, "top_p": 1e-300, "seed": 3},
        {"temperature": 1e308, "min_p": 1.0},
        {"temperature": 5e-324, "top_k": 1, "seed": 4},
    ],
    ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()),
)
def test_extreme_sampling_values_keep_the_filters(fw, fields):
    """top_k=1, min_p=1 and a tiny top_p each leave only the most likely token, and a
    temperature too small to invert in float32 is greedy: each must give the greedy text.
    (Found by this suite: 1/temperature overflowing to inf, or underflowing to 0 so that
    -inf * 0 = NaN, and top_p * mass rounding to 0, sampled tokens outside the filter.)"""
    greedy = fw.request("greedy-ref", prompt=PROMPT, max_tokens=12)["text"]
    rid = "x-" + "-".join(f"{k}{v}" for k, v in fields.items())[:100]
    got = fw.request(rid, prompt=PROMPT, max_tokens=12, **fields)
    assert got["type"] == "done" and got["text"] == greedy, (fields, got["text"], greedy)


# =====================================================================================
# the parent killed with SIGKILL
# =====================================================================================
PR_SET_CHILD_SUBREAPER = 36
PARENT = r"""
import os, subprocess, sys, time
mode = sys.argv[1]
if mode.startswith("held"):   # the test holds the worker's pipes: only PDEATHSIG can end it
    p = subprocess.Popen(sys.argv[5:], stdin=int(sys.argv[2]), stdout=int(sys.argv[3]), stderr=int(sys.argv[4]))
    print(p.pid, flush=True)
else:
    p = subprocess.Popen(sys.argv[2:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    print(p.pid, flush=True)
    print(p.stdout.readline().decode().strip(), flush=True)
    if mode == "busy":        # long streams, and nobody reads them: the worker blocks on stdout
        for i in range(8):
            p.stdin.write(b'{"id":"b%d","prompt":"x","max_tokens":2000,"stream":true}\n' % i)
        p.stdin.flush()
print("go", flush=True)
time.sleep(600)
"""
STREAMS = b"".join(b'{"id":"h%d","prompt":"x","max_tokens":2000,"stream":true}\n' % i for i in range(8))
# Each cancel of an unknown id logs one line on stderr: ~3000 of them fill a 64 KiB pipe.
LOG_FLOOD = b"".join(b'{"op":"cancel","id":"nobody-%05d"}\n' % i for i in range(3000))


def _set_subreaper(on):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _unread(fd):
    """Bytes waiting in a pipe (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _wait_blocked_writing(pid, timeout=60):
    """Until the worker's main thread sleeps in a pipe write (stdout or stderr is full)."""
    wchan = Path(f"/proc/{pid}/wchan")
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = wchan.read_text().strip()
        if "pipe_write" in seen:  # pipe_write, anon_pipe_write (6.x kernels)
            return
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if seen in ("", "0") and state in ("S", "D"):  # a kernel that hides wchan: wait instead
            time.sleep(3.0)
            return
        time.sleep(0.02)
    pytest.fail(f"the worker never blocked writing a pipe (wchan {seen!r})")


# busy and held_stdout overlap tests/test_worker_lifecycle.py (stdout blocked): slow only.
@pytest.mark.parametrize(
    "mode",
    [
        "idle",
        pytest.param("busy", marks=pytest.mark.slow),
        pytest.param("held_stdout", marks=pytest.mark.slow),
        "held_stderr",
    ],
)
def test_worker_exits_within_2s_of_its_parent_being_killed(mode):
    """idle: the parent owns the pipes, the worker waits for requests. busy: eight long
    streams nobody reads (the worker is blocked writing stdout). held_stdout / held_stderr:
    the pipes stay open in this process and the worker is blocked writing stdout / stderr
    (a parent that never reads the worker's log), so only PR_SET_PDEATHSIG (SIGTERM, then the
    exit watchdog) can end it. The test process is the child subreaper, so the orphaned
    worker is reparented to it and reaped here: its exit is measured, and nothing is left."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG / PR_SET_CHILD_SUBREAPER are Linux-only")
    ensure_tiny_model()
    worker_cmd = [sys.executable, "-m", "worker", "--model", str(TINY)]
    env = worker_env(LONG)
    held = []
    parent = None
    worker_pid = None
    _set_subreaper(True)
    try:
        if mode.startswith("held"):
            pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
            child_ends = (pipes[0][0], pipes[1][1], pipes[2][1])
            held = [pipes[0][1], pipes[1][0], pipes[2][0]]
            parent = subprocess.Popen(
                [sys.executable, "-c", PARENT, mode, *map(str, child_ends), *worker_cmd],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                env=env,
                pass_fds=child_ends,
            )
            for fd in child_ends:
                os.close(fd)
            worker_pid = int(parent.stdout.readline())
            with os.fdopen(os.dup(held[1]), "rb") as out:
                assert json.loads(out.readline())["type"] == "ready"
            os.write(held[0], STREAMS if mode == "held_stdout" else LOG_FLOOD)
        else:
            parent = subprocess.Popen(
                [sys.executable, "-c", PARENT, mode, *worker_cmd], cwd=ROOT, stdout=subprocess.PIPE, env=env
            )
            worker_pid = int(parent.stdout.readline())
            assert json.loads(parent.stdout.readline())["type"] == "ready"
        assert parent.stdout.readline().strip() == b"go"
        if mode == "held_stdout":  # the stdout pipe really is full (64 KiB)
            deadline = time.monotonic() + 60
            while _unread(held[1]) < 60 << 10 and time.monotonic() < deadline:
                time.sleep(0.02)
        if mode != "idle":
            _wait_blocked_writing(worker_pid)
        worker = psutil.Process(worker_pid)
        assert worker.ppid() == parent.pid and worker.status() != psutil.STATUS_ZOMBIE
        descendants = [worker_pid] + [c.pid for c in worker.children(recursive=True)]

        t0 = time.monotonic()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        status = None
        while time.monotonic() - t0 < 10:
            pid, status = os.waitpid(worker_pid, os.WNOHANG)
            if pid == worker_pid:
                break
            time.sleep(0.002)
        else:
            pytest.fail(
                f"{mode}: the worker outlived its parent by 10 s; main thread in "
                f"{Path(f'/proc/{worker_pid}/wchan').read_text()!r}"
            )
        latency = time.monotonic() - t0
        worker_pid = None
        report(
            test=f"parent_sigkill_{mode}",
            exit_latency_s=round(latency, 3),
            exit_status=os.waitstatus_to_exitcode(status),
        )
        assert latency < 2.0, f"{mode}: the worker exited {latency:.2f} s after its parent"
        assert os.waitstatus_to_exitcode(status) == 0, status
        for pid in descendants:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if worker_pid is not None and psutil.pid_exists(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)  # never leave an orphan behind
            try:
                os.waitpid(worker_pid, 0)
            except ChildProcessError:
                pass
        if parent is not None and parent.poll() is None:
            parent.kill()
            parent.wait()
        _set_subreaper(False)
        for fd in held:
            os.close(fd)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="reads /proc/PID/wchan (Linux) to see the worker blocked writing stderr",
)
def test_sigterm_exits_within_2s_while_stderr_is_not_read():
    """A parent that never reads the worker's stderr: the log fills the pipe and the worker
    blocks writing it, holding the logger's lock. SIGTERM must still end it within 2 s (its
    handler used to log before arming the exit watchdog, and deadlocked on that lock)."""
    proc = spawn_raw(LONG, stderr=subprocess.PIPE)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        proc.stdin.write(LOG_FLOOD)
        proc.stdin.flush()
        _wait_blocked_writing(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"no exit 10 s after SIGTERM; main thread in {Path(f'/proc/{proc.pid}/wchan').read_text()!r}"
            )
        latency = time.monotonic() - t0
        report(test="sigterm_stderr_blocked", exit_latency_s=round(latency, 3), exit_status=rc)
        assert rc == 0 and latency < 2.0, (rc, latency)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# =====================================================================================
# a parent that stops reading stdout
# =====================================================================================
@pytest.mark.slow  # tests/test_worker_lifecycle.py covers backpressure with pings in `make test`
def test_backpressure_with_streaming_requests():
    """Offer ~4 MiB of streaming requests (about four times what fits in the pipes and the
    worker's queues) while nobody reads stdout: the worker takes a bounded amount (then its
    stdin pipe stays full), its RSS stays flat, and once the parent reads again every request
    gets exactly one terminal message (done, or overloaded for those beyond --max-queue)."""
    ensure_tiny_model()
    n = 4000
    prefix = "Conta-me tudo sobre o Farense, o Estádio de São Luís e a cidade de Faro. " * 12
    lines = [
        json.dumps(
            {"id": f"r{i}", "prompt": f"{prefix}{i}", "max_tokens": 6, "stream": True}, ensure_ascii=False
        ).encode()
        + b"\n"
        for i in range(n)
    ]
    data = b"".join(lines)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "--model", str(TINY), "--max-queue", "32", "--max-batch", "16"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=worker_env(LONG),
    )
    out_lines = []
    try:
        assert json.loads(proc.stdout.readline())["type"] == "ready"
        rss_idle = rss(proc.pid)
        fd = proc.stdin.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        sent = 0
        last_progress = time.monotonic()
        while sent < len(data) and time.monotonic() - last_progress < 2.0:
            try:
                sent += os.write(fd, data[sent : sent + 65536])
                last_progress = time.monotonic()
            except BlockingIOError:
                time.sleep(0.005)
        stalled_at = sent
        rss_stall = rss(proc.pid)
        time.sleep(2.0)
        try:  # still nothing taken 2 s later
            sent += os.write(fd, data[sent : sent + 65536])
        except BlockingIOError:
            pass
        rss_later = rss(proc.pid)
        assert proc.poll() is None
        accepted = stalled_at
        figures = dict(
            test="backpressure_streams",
            bytes_offered=len(data),
            bytes_accepted=accepted,
            requests_accepted=sum(1 for _ in data[:accepted].splitlines()),
            rss_idle_mb=round(rss_idle / 2**20, 1),
            rss_stall_mb=round(rss_stall / 2**20, 1),
            rss_2s_later_mb=round(rss_later / 2**20, 1),
        )
        report(**figures)
        assert accepted < min(2 << 20, len(data) // 2), figures  # bounded: not all that was offered
        assert sent == stalled_at, figures  # the worker read nothing more
        assert rss_later <= rss_stall * 1.05 + (4 << 20), figures

        # the parent reads again: everything is answered, exactly once
        reader = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
        reader.start()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        t_drain = time.monotonic()
        proc.stdin.write(data[sent:])
        proc.stdin.close()
        assert proc.wait(300) == 0
        reader.join(30)
        drain_s = time.monotonic() - t_drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    terminals = {}
    texts = {}
    for raw in out_lines:
        m = json.loads(raw)
        assert not list(VALIDATOR.iter_errors(m)), m
        if m["type"] == "token":
            assert m["id"] not in terminals, "a token after the terminal message"
            texts[m["id"]] = texts.get(m["id"], "") + m["text"]
        elif m["type"] in TERMINAL:
            assert m["id"] not in terminals, f"{m['id']} answered twice"
            terminals[m["id"]] = m
    assert len(terminals) == n
    done = [m for m in terminals.values() if m["type"] == "done"]
    overloaded = [m for m in terminals.values() if m["type"] == "error"]
    assert all(m["code"] == "overloaded" for m in overloaded)
    assert done and all(texts.get(m["id"], "") == m["text"] for m in done)
    report(
        test="backpressure_streams_drained",
        done=len(done),
        overloaded=len(overloaded),
        drain_s=round(drain_s, 1),
    )
