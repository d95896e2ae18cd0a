"""worker/protocol.py: request parsing and validation (pure, no mlx), unit tests and fuzzing.

The contract: parse_line never raises; each line gives None (blank), a Generate, a Control or
exactly one ParseError, and every error is a valid protocol message.
"""

import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import REQUEST_VALIDATOR, VALIDATOR  # noqa: E402

from worker import protocol
from worker.protocol import Control, Generate, ParseError, parse_line


def p(obj):
    return parse_line(json.dumps(obj, ensure_ascii=False).encode())


def check_result(result):
    """The invariant: one of the four outcomes; an error is a valid protocol message."""
    assert result is None or isinstance(result, (Generate, Control, ParseError)), result
    if isinstance(result, ParseError):
        msg = result.to_message()
        assert not list(VALIDATOR.iter_errors(msg)), msg
        assert result.code in ("bad_json", "invalid_request", "too_large")
    if isinstance(result, Generate):
        assert protocol.valid_id(result.id)
        assert result.messages and all(m["role"] in protocol.ROLES for m in result.messages)
    return result


# ------------------------------------------------------------------ valid requests
def test_prompt_is_a_user_message():
    r = p({"id": "c2", "prompt": "Qual é o estádio do Farense?", "stream": True, "max_tokens": 64})
    assert isinstance(r, Generate)
    assert r.messages == ({"role": "user", "content": "Qual é o estádio do Farense?"},)
    assert r.stream is True and r.max_tokens == 64
    assert r.temperature is None and r.seed is None and r.stop == ()


def test_messages_and_all_fields():
    r = p(
        {
            "id": "c1",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "max_tokens": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "stop": ["\n\n", "FIM"],
            "seed": 7,
            "stream": False,
        }
    )
    assert isinstance(r, Generate)
    assert [m["role"] for m in r.messages] == ["system", "user"]
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.min_p) == (5, 0.7, 0.9, 40, 0.05)
    assert r.repetition_penalty == 1.1 and r.stop == ("\n\n", "FIM") and r.seed == 7


def test_stop_string_and_integral_float():
    r = p({"id": "x", "prompt": "a", "stop": "FIM", "max_tokens": 3.0, "seed": -1})
    assert r.stop == ("FIM",) and r.max_tokens == 3 and isinstance(r.max_tokens, int)
    assert r.seed == (1 << 64) - 1


def test_controls():
    assert p({"op": "cancel", "id": "c1"}) == Control("cancel", "c1")
    assert p({"op": "ping"}) == Control("ping", None)
    assert p({"op": "ping", "id": "p1"}) == Control("ping", "p1")
    assert p({"op": "stats"}) == Control("stats")
    assert p({"op": "shutdown"}) == Control("shutdown")


def test_blank_lines_and_crlf():
    assert parse_line(b"") is None
    assert parse_line(b"   \r\n") is None
    assert isinstance(parse_line(b'{"id":"a","prompt":"x"}\r\n'), Generate)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "line, code, rid, field",
    [
        (b"not json", "bad_json", None, None),
        (b"[1, 2]", "bad_json", None, None),
        (b'"just a string"', "bad_json", None, None),
        (b'{"id": "a", "prompt": "x"', "bad_json", None, None),
        (b'{"id":"a","prompt":"\xff"}', "bad_json", None, None),
        (b'{"id":"a","prompt":"x"}\x00', "bad_json", None, None),
        (b'{"id":"a","prompt":"\\ud800"}', "bad_json", None, None),
        (b'{"id":"a","prompt":"x","max_tokens":1e999}', "bad_json", None, None),
        (b'{"prompt":"x"}', "invalid_request", None, "id"),
        (b'{"id":"","prompt":"x"}', "invalid_request", None, "id"),
        (b'{"id":5,"prompt":"x"}', "invalid_request", None, "id"),
        (('{"id":"%s","prompt":"x"}' % ("a" * 129)).encode(), "invalid_request", None, "id"),
        (b'{"id":"a"}', "invalid_request", "a", "messages"),
        (
            b'{"id":"a","prompt":"x","messages":[{"role":"user","content":"y"}]}',
            "invalid_request",
            "a",
            "messages",
        ),
        (b'{"id":"a","prompt":"x","bogus":1}', "invalid_request", "a", "bogus"),
        (b'{"id":"a","prompt":3}', "invalid_request", "a", "prompt"),
        (b'{"id":"a","messages":[]}', "invalid_request", "a", "messages"),
        (
            b'{"id":"a","messages":[{"role":"robot","content":"x"}]}',
            "invalid_request",
            "a",
            "messages[0].role",
        ),
        (b'{"id":"a","messages":[{"role":"user"}]}', "invalid_request", "a", "messages[0].content"),
        (
            b'{"id":"a","messages":[{"role":"user","content":"x","name":"n"}]}',
            "invalid_request",
            "a",
            "messages[0].name",
        ),
        (b'{"id":"a","messages":["hi"]}', "invalid_request", "a", "messages[0]"),
        (b'{"id":"a","prompt":"x","max_tokens":0}', "invalid_request", "a", "max_tokens"),
        (b'{"id":"a","prompt":"x","max_tokens":1.5}', "invalid_request", "a", "max_tokens"),
        (b'{"id":"a","prompt":"x","max_tokens":true}', "invalid_request", "a", "max_tokens"),
        (b'{"id":"a","prompt":"x","temperature":-0.1}', "invalid_request", "a", "temperature"),
        (b'{"id":"a","prompt":"x","temperature":"hot"}', "invalid_request", "a", "temperature"),
        (b'{"id":"a","prompt":"x","top_p":0}', "invalid_request", "a", "top_p"),
        (b'{"id":"a","prompt":"x","top_p":1.5}', "invalid_request", "a", "top_p"),
        (b'{"id":"a","prompt":"x","top_k":-1}', "invalid_request", "a", "top_k"),
        (b'{"id":"a","prompt":"x","min_p":2}', "invalid_request", "a", "min_p"),
        (b'{"id":"a","prompt":"x","repetition_penalty":0}', "invalid_request", "a", "repetition_penalty"),
        (b'{"id":"a","prompt":"x","stop":""}', "invalid_request", "a", "stop"),
        (b'{"id":"a","prompt":"x","stop":["a",""]}', "invalid_request", "a", "stop[1]"),
        (b'{"id":"a","prompt":"x","stop":5}', "invalid_request", "a", "stop"),
        (
            ('{"id":"a","prompt":"x","stop":%s}' % json.dumps(["s%d" % i for i in range(17)])).encode(),
            "invalid_request",
            "a",
            "stop",
        ),
        (b'{"id":"a","prompt":"x","seed":1.5}', "invalid_request", "a", "seed"),
        (b'{"id":"a","prompt":"x","stream":"yes"}', "invalid_request", "a", "stream"),
        (b'{"op":"cancel"}', "invalid_request", None, "id"),
        (b'{"op":"cancel","id":""}', "invalid_request", None, "id"),
        (b'{"op":"dance"}', "invalid_request", None, "op"),
        (b'{"op":5}', "invalid_request", None, "op"),
        (b'{"op":"ping","extra":1}', "invalid_request", None, "extra"),
        (b'{"op":"cancel","id":"c1","prompt":"x"}', "invalid_request", None, "prompt"),
    ],
)
def test_errors_name_the_field(line, code, rid, field):
    r = check_result(parse_line(line))
    assert isinstance(r, ParseError), r
    assert r.code == code, r
    assert r.id == rid, r
    if field is not None:
        assert r.message.startswith(field + ":"), r.message
    if code == "bad_json" and line.startswith(b"{") and b"\\ud800" not in line:
        assert "invalid JSON" in r.message or "object" in r.message


def test_bad_json_carries_the_parser_reason():
    r = parse_line(b'{"id": "a",}')
    assert r.code == "bad_json" and "line 1 column" in r.message


def test_deep_nesting_is_an_error_not_a_crash():
    for depth in (33, 100, 1000, 5000, 100_000):
        line = b'{"id":"a","prompt":"x","extra":' + b"[" * depth + b"]" * depth + b"}"
        r = check_result(parse_line(line))
        assert isinstance(r, ParseError), depth
    # Deep but known field: invalid_request naming it (the id is usable).
    line = b'{"id":"a","messages":' + b"[" * 40 + b"]" * 40 + b"}"
    r = parse_line(line)
    assert r.code == "invalid_request" and r.id == "a" and r.message.startswith("messages:")
    # Exactly 32 levels in all is allowed as far as nesting goes (and then fails on type).
    line = b'{"id":"a","prompt":"x","max_tokens":' + b"[" * 31 + b"]" * 31 + b"}"
    r = parse_line(line)
    assert r.code == "invalid_request" and r.message.startswith("max_tokens:")
    # Deep nesting in a bare array: bad_json (not an object) or the parser's own limit.
    assert parse_line(b"[" * 2000 + b"]" * 2000).code == "bad_json"


def test_huge_numbers():
    r = parse_line(b'{"id":"a","prompt":"x","max_tokens":123456789012345678901234567890}')
    # Beyond 64 bits the JSON parser gives a float; integral, so accepted (and capped later).
    assert isinstance(r, Generate) and r.max_tokens > 2**64
    r = parse_line(b'{"id":"a","prompt":"x","seed":123456789012345678901234567890}')
    assert isinstance(r, Generate) and 0 <= r.seed < 2**64
    r = parse_line(b'{"id":"a","prompt":"x","temperature":1e308}')
    assert isinstance(r, Generate) and r.temperature == 1e308


def test_nul_and_escapes_inside_strings():
    r = parse_line(b'{"id":"a","prompt":"x\\u0000y"}')
    assert isinstance(r, Generate) and r.messages[0]["content"] == "x\x00y"
    assert parse_line(b'{"id":"a","prompt":"x\x00y"}').code == "bad_json"
    r = parse_line('{"id":"a","prompt":"\\ud83d\\ude00 olá"}'.encode())
    assert r.messages[0]["content"] == "\U0001f600 olá"


def test_valid_requests_match_the_schema():
    """Everything the parser accepts, the schema's $defs/request accepts too."""
    for obj in (
        {"id": "a", "prompt": "x"},
        {"op": "ping"},
        {"op": "cancel", "id": "z"},
        {"id": "b", "messages": [{"role": "user", "content": "x"}], "stop": ["a"], "seed": 3},
    ):
        assert isinstance(p(obj), (Generate, Control))
        assert not list(REQUEST_VALIDATOR.iter_errors(obj))


# ------------------------------------------------------------------ fuzzing
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
field_values = {
    "id": st.one_of(st.text(max_size=130), json_values),
    "prompt": st.one_of(st.text(max_size=40), json_values),
    "messages": st.one_of(
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["system", "user", "assistant", "x"]),
                    "content": st.one_of(st.text(max_size=20), json_values),
                }
            ),
            max_size=4,
        ),
        json_values,
    ),
    "max_tokens": st.one_of(st.integers(-5, 2**66), json_values),
    "temperature": st.one_of(st.floats(-1, 5), json_values),
    "top_p": st.one_of(st.floats(-0.5, 1.5), json_values),
    "top_k": st.one_of(st.integers(-3, 100), json_values),
    "min_p": st.one_of(st.floats(-0.5, 1.5), json_values),
    "repetition_penalty": st.one_of(st.floats(-1, 3), json_values),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=18), json_values),
    "seed": st.one_of(st.integers(-(2**70), 2**70), json_values),
    "stream": st.one_of(st.booleans(), json_values),
    "op": st.one_of(st.sampled_from(["cancel", "ping", "stats", "shutdown", "nope"]), json_values),
}
requests_like = st.dictionaries(
    st.one_of(st.sampled_from(sorted(field_values)), st.text(max_size=6)),
    st.just(None),
    max_size=7,
).flatmap(lambda keys: st.fixed_dictionaries({k: field_values.get(k, json_values) for k in keys}))

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))


def _roundtrip(obj):
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass")
    except ValueError:
        return None


@FUZZ
@given(requests_like)
def test_fuzz_request_shaped_objects(obj):
    line = _roundtrip(obj)
    if line is None:
        return
    r = check_result(parse_line(line))
    if isinstance(r, (Generate, Control)):
        # Whatever the parser accepts, the schema accepts (modulo integral floats).
        if not any(isinstance(v, float) for v in obj.values()):
            assert not list(REQUEST_VALIDATOR.iter_errors(obj)), obj
    elif isinstance(obj, dict) and "op" not in obj and protocol.valid_id(obj.get("id")):
        assert r.id == obj["id"] or r.message.startswith("id")  # a usable id is kept


@FUZZ
@given(json_values)
def test_fuzz_any_json_value(value):
    line = _roundtrip(value)
    if line is not None:
        check_result(parse_line(line))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    check_result(parse_line(data))


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_random_text_with_surrogates(text):
    check_result(parse_line(text.encode("utf-8", "surrogatepass")))
    check_result(parse_line(('{"id":"a","prompt":"' + text + '"}').encode("utf-8", "surrogatepass")))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(1, 3000), st.sampled_from([b"[", b'{"a":']), st.booleans())
def test_fuzz_deep_nesting(depth, opener, close):
    closer = b"]" if opener == b"[" else b"}"
    inner = opener * depth + b"1" + (closer * depth if close else b"")
    check_result(parse_line(b'{"id":"deep","prompt":"x","k":' + inner + b"}"))
    check_result(parse_line(inner))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(min_value=-(10**400), max_value=10**400), st.sampled_from(sorted(field_values)))
def test_fuzz_huge_numbers(n, field):
    line = ('{"id":"n","prompt":"x","%s":%d}' % (field, n)).encode()
    r = check_result(parse_line(line))
    if isinstance(r, Generate) and field == "seed":
        assert 0 <= r.seed < 2**64
    if isinstance(r, Generate) and field in ("temperature", "top_p", "min_p", "repetition_penalty"):
        assert math.isfinite(getattr(r, field))
