"""The context-window policy through the real worker, at the exact boundary (--context-length 2048).

Prompt lengths come from the worker's own loading and prompt functions (worker.loading,
core.prompt.encode_prompt) in this process, so the boundaries are exact whatever the tokenizer.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import TINY, Worker, ensure_tiny_model  # noqa: E402

CONTEXT = 2048


def words(n, word="Farense"):
    return " ".join([word] * n)


def turn(role, n):
    return {"role": role, "content": words(n)}


SYSTEM = turn("system", 20)
CONV = [
    SYSTEM,
    turn("user", 300),
    turn("assistant", 300),
    turn("user", 250),
    turn("assistant", 250),
    turn("user", 40),
]


@pytest.fixture(scope="module")
def w():
    worker = Worker("--context-length", str(CONTEXT))  # the tiny model's own window: 32768
    assert worker.ready["context_length"] == CONTEXT
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def n_tokens():
    ensure_tiny_model()
    import worker  # noqa: F401  (fast BLAS before mlx)
    from core.prompt import encode_prompt
    from worker import loading

    _, tokenizer, _ = loading.load(loading.settings_for(str(TINY), None, None))
    return lambda messages: len(encode_prompt(tokenizer, messages, None))


def last_turn_at(n_tokens, total):
    """A last user turn that makes [SYSTEM, it] exactly `total` tokens long."""
    for n in range(1, 4 * CONTEXT):
        k = n_tokens([SYSTEM, turn("user", n)])
        if k == total:
            return turn("user", n)
        if k > total:
            break
    pytest.skip(f"no filler length gives exactly {total} tokens with this tokenizer")


def test_fits_exactly_nothing_dropped(w, n_tokens):
    full = n_tokens(CONV)
    d = w.request("fit", messages=CONV, max_tokens=CONTEXT - full, timeout=120)
    assert d["type"] == "done", d
    assert d["usage"]["prompt_tokens"] == full and d["usage"]["dropped_messages"] == 0


def test_one_token_over_drops_the_oldest_turn(w, n_tokens):
    full = n_tokens(CONV)
    d = w.request("over", messages=CONV, max_tokens=CONTEXT - full + 1, timeout=120)
    assert d["type"] == "done", d
    assert d["usage"]["dropped_messages"] == 2
    assert d["usage"]["prompt_tokens"] == n_tokens([SYSTEM] + CONV[3:])


def test_error_policy_keeps_everything(w, n_tokens):
    full = n_tokens(CONV)
    d = w.request("err", messages=CONV, max_tokens=CONTEXT - full + 1, overflow="error", timeout=120)
    assert d["type"] == "done" and d["usage"]["dropped_messages"] == 0
    assert d["usage"]["prompt_tokens"] == full and d["usage"]["completion_tokens"] <= CONTEXT - full


def test_last_user_turn_alone_at_the_boundary(w, n_tokens):
    last = last_turn_at(n_tokens, CONTEXT - 1)  # room for exactly 1 token
    conv = [SYSTEM, turn("user", 300), turn("assistant", 300), last]
    d = w.request("alone", messages=conv, max_tokens=50, timeout=120)
    assert d["type"] == "done", d
    assert d["usage"]["prompt_tokens"] == CONTEXT - 1 and d["usage"]["dropped_messages"] == 2
    assert d["usage"]["completion_tokens"] <= 1

    too = last_turn_at(n_tokens, CONTEXT)  # no room left at all
    e = w.request("alone-too", messages=[SYSTEM, turn("user", 300), turn("assistant", 300), too])
    assert e["type"] == "error" and e["code"] == "too_long"
    assert "last user turn alone" in e["message"] and f"{CONTEXT} tokens" in e["message"]


def test_error_policy_too_long_where_truncate_serves(w, n_tokens):
    last = last_turn_at(n_tokens, CONTEXT - 400)
    conv = [SYSTEM, turn("user", 300), turn("assistant", 300), last]
    assert n_tokens(conv) >= CONTEXT
    e = w.request("strict", messages=conv, max_tokens=5, overflow="error")
    assert e["type"] == "error" and e["code"] == "too_long" and "overflow: error" in e["message"]
    d = w.request("lenient", messages=conv, max_tokens=5)
    assert d["type"] == "done" and d["usage"]["dropped_messages"] == 2
