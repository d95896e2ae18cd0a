"""The context-window policy (worker/context.py) as pure logic, with a counting encoder."""

import pytest

from worker import context, protocol


def encode(messages):
    """1 token of BOS, then per message 2 tokens of framing + 1 per word."""
    return list(range(1 + sum(2 + len(m["content"].split()) for m in messages)))


def msg(role, words):
    return {"role": role, "content": " ".join(["w"] * words)}


SYSTEM = msg("system", 5)  # 7 tokens
CONV = [
    SYSTEM,
    msg("user", 3),
    msg("assistant", 3),  # turn 1: 10 tokens
    msg("user", 8),
    msg("assistant", 8),  # turn 2: 20 tokens
    msg("user", 4),
]  # last: 6 tokens
FULL = len(encode(CONV))  # 1 + 7 + 10 + 20 + 6 = 44


def test_split_turns_keeps_system_and_last_user_turn():
    head, turns, last = context.split_turns(CONV)
    assert head == [SYSTEM] and last == [CONV[-1]]
    assert turns == [CONV[1:3], CONV[3:5]]
    # A conversation may open with an assistant message: a turn of its own.
    head, turns, last = context.split_turns([msg("assistant", 1), msg("user", 1)])
    assert head == [] and turns == [[msg("assistant", 1)]] and last == [msg("user", 1)]


def test_fits_exactly_drops_nothing():
    f = context.fit(encode, CONV, max_tokens=10, context_length=FULL + 10)
    assert f.dropped == 0 and f.messages == CONV and f.max_tokens == 10 and len(f.ids) == FULL


def test_one_token_over_drops_the_oldest_whole_turn():
    f = context.fit(encode, CONV, max_tokens=11, context_length=FULL + 10)
    assert f.dropped == 2 and f.messages == [SYSTEM] + CONV[3:]
    assert len(f.ids) == FULL - 10 and f.max_tokens == 11


def test_drops_as_few_turns_as_needed():
    # Leaving out turn 1 frees 10 tokens; 11 more need turn 2 gone too.
    f = context.fit(encode, CONV, max_tokens=21, context_length=FULL)
    assert f.dropped == 4 and f.messages == [SYSTEM, CONV[-1]] and f.max_tokens == 21


def test_last_turn_alone_then_capped_max_tokens():
    last_alone = 1 + 7 + 6
    f = context.fit(encode, CONV, max_tokens=100, context_length=last_alone + 1)
    assert f.dropped == 4 and len(f.ids) == last_alone and f.max_tokens == 1


def test_too_long_only_when_last_turn_alone_cannot_fit():
    last_alone = 1 + 7 + 6
    with pytest.raises(context.TooLong, match="last user turn alone: 14 tokens; the context holds 14"):
        context.fit(encode, CONV, max_tokens=1, context_length=last_alone)


def test_error_policy_drops_nothing():
    f = context.fit(encode, CONV, max_tokens=100, context_length=FULL + 1, overflow=context.ERROR)
    assert f.dropped == 0 and f.max_tokens == 1 and f.messages == CONV
    with pytest.raises(context.TooLong, match="the prompt: 44 tokens"):
        context.fit(encode, CONV, max_tokens=1, context_length=FULL, overflow=context.ERROR)


def test_no_context_length_means_no_policy():
    f = context.fit(encode, CONV, max_tokens=10**6, context_length=None)
    assert f.dropped == 0 and f.max_tokens == 10**6


def test_overflow_field_is_parsed():
    r = protocol.parse_line(b'{"id":"a","prompt":"x","overflow":"error"}')
    assert isinstance(r, protocol.Generate) and r.overflow == "error"
    assert protocol.parse_line(b'{"id":"a","prompt":"x"}').overflow == "truncate"
    e = protocol.parse_line(b'{"id":"a","prompt":"x","overflow":"shift"}')
    assert isinstance(e, protocol.ParseError) and e.message == "overflow: must be one of truncate, error"


def test_response_messages_are_built_in_protocol():
    assert protocol.token_message("a", "t") == {"type": "token", "id": "a", "text": "t"}
    assert protocol.error_message(None, "bad_json", "m") == protocol.ParseError("bad_json", "m").to_message()
    assert protocol.pong_message("p") == {"type": "pong", "id": "p"}
    done = protocol.done_message("a", "x", "stop", {"prompt_tokens": 1}, {"total_ms": 1.0}, "m", None)
    assert done["type"] == "done" and done["model"] == "m" and done["adapter"] is None
    assert (
        protocol.ready_message(
            model="m",
            adapter=None,
            pid=1,
            max_tokens=1,
            max_tokens_cap=1,
            max_line_bytes=1,
            context_length=None,
            backend="cpu",
            blas=None,
            version="",
        )["protocol"]
        == protocol.PROTOCOL_VERSION
    )
