"""One generation request inside the worker, engine-independent: its state (Active), the
context policy and the prompt's ids (fit), its sampling settings resolved and clamped
(sampling_settings), where its system prompt ends in the ids (system_end), and its text out:
stop strings and split characters held back (push)."""

import time
from dataclasses import dataclass, field
from typing import Any

from core.prompt import encode_prompt, with_system_prompt
from worker import context, protocol

REPLACEMENT = "\ufffd"
# Sampling runs on float32 log-probabilities. Beyond these bounds 1/temperature overflows to
# inf or underflows to 0 (then -inf * 0 = NaN for the tokens a filter removed), and mlx-lm's
# apply_top_p compares with top_p * mass rounded to 0 (then indexes past the vocabulary): the
# sampled tokens fell outside top_k/top_p/min_p. Clamping keeps the meaning: a smaller
# temperature is greedy, a larger one is uniform over the tokens the filters keep, and a
# smaller top_p keeps only the most likely token (tests/test_reliability_worker.py).
MIN_TEMPERATURE = 1e-30
MAX_TEMPERATURE = 1e30
MIN_TOP_P = 1e-6


class Refused(Exception):
    """The request is answered with an error message: code, message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def _ms(seconds):
    return round(seconds * 1000.0, 3)


@dataclass(eq=False, slots=True)
class Active:
    """One accepted generation request and its state until its terminal message."""

    req: protocol.Generate
    ids: list | None = None  # prompt token ids (after the context policy)
    dropped: int = 0  # messages the context policy left out
    sys_end: int = 0  # prompt tokens of the leading system message(s)
    max_tokens: int = 1
    sampling: Any = None  # the engine's sampler objects (engine.sampling)
    uid: int | None = None  # the engine's uid once admitted
    cached: int = 0  # prompt tokens served from the prefix cache
    detok: Any = None
    parts: list = field(default_factory=list)
    tail: str | None = ""  # text held back (stop string / split character)
    n_tokens: int = 0
    t_received: float = 0.0
    t_admitted: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    fault: bool = False

    def __post_init__(self):
        self.t_received = self.req.received or time.perf_counter()

    @property
    def id(self):
        return self.req.id

    @property
    def stream(self):
        return self.req.stream

    @property
    def stops(self):
        return self.req.stop


def fit(tokenizer, system_prompt, gen, context_length, req, log):
    """The prompt after the context policy (worker/context.py); Refused with the error."""
    wanted = req.max_tokens if req.max_tokens is not None else int(gen["max_tokens"])
    wanted = min(wanted, int(gen["max_tokens_cap"]))
    messages = with_system_prompt(list(req.messages), system_prompt)
    try:
        fitted = context.fit(
            lambda ms: encode_prompt(tokenizer, ms, None), messages, wanted, context_length, req.overflow
        )
    except context.TooLong as e:
        raise Refused("too_long", f"{e.message} (overflow: {req.overflow})") from None
    except Exception as e:
        if type(e).__name__ == "TemplateError" or "jinja" in type(e).__module__:
            raise Refused("invalid_request", f"messages: rejected by the chat template: {e}") from None
        raise Refused("internal", f"formatting the prompt failed: {type(e).__name__}: {e}") from None
    if not fitted.ids:
        raise Refused("invalid_request", "messages: the formatted prompt is empty")
    if fitted.dropped:
        log.info(
            f"request {req.id!r}: left out the {fitted.dropped} oldest message(s) to fit the context",
            prompt_tokens=len(fitted.ids),
        )
    return fitted


def sampling_settings(req, gen, vocab_size):
    """(temperature, top_p, min_p, top_k, repetition_penalty): the request's, else the
    adapter's defaults, clamped to what sampling can compute."""
    temp = req.temperature if req.temperature is not None else float(gen["temperature"])
    top_p = req.top_p if req.top_p is not None else float(gen["top_p"])
    top_k = req.top_k if req.top_k is not None else int(gen["top_k"])
    min_p = req.min_p if req.min_p is not None else float(gen["min_p"])
    rep = req.repetition_penalty if req.repetition_penalty is not None else float(gen["repetition_penalty"])
    if top_k >= vocab_size:
        top_k = 0
    if temp < MIN_TEMPERATURE:
        temp = 0.0
    temp = min(temp, MAX_TEMPERATURE)
    if 0.0 < top_p < MIN_TOP_P:
        top_p = MIN_TOP_P
    return temp, top_p, min_p, top_k, rep


def system_end(tokenizer, probes, messages, ids):
    """Tokens of the prompt that belong to its leading system message(s) (0 if none);
    probes: a dict kept by the caller (system messages -> their rendering's ids)."""
    n = 0
    while n < len(messages) and messages[n]["role"] == "system":
        n += 1
    if n == 0:
        return 0
    key = tuple(m["content"] for m in messages[:n])
    probe = probes.get(key)
    if probe is None:
        probe = encode_prompt(tokenizer, list(messages[:n]) + [{"role": "user", "content": ""}], None)
        if len(probes) > 64:
            probes.clear()
        probes[key] = probe
    end = 0
    for a, b in zip(probe, ids):
        if a != b:
            break
        end += 1
    return end if 0 < end < len(ids) else 0


def push(act, seg, writer):
    """Add decoded text; emit what can no longer be part of a stop string or a split
    character. Returns True if a stop string completed (the text ends before it)."""
    buf = act.tail + seg if act.tail else seg
    hold = 0
    stops = act.stops
    if stops:
        first = -1
        for s in stops:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first):
                first = i
        if first >= 0:
            act.tail = ""
            emit(act, buf[:first], writer)
            act.tail = None  # a stop string ended the text: nothing more is added
            return True
        for s in stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
    keep = len(buf) - hold
    while keep > 0 and buf[keep - 1] == REPLACEMENT:
        keep -= 1
    if keep == len(buf):
        act.tail = ""
        emit(act, buf, writer)
    else:
        act.tail = buf[keep:]
        emit(act, buf[:keep], writer)
    return False


def emit(act, text, writer):
    if text:
        act.parts.append(text)
        if act.stream:
            writer.add(protocol.token_message(act.id, text))


def done_message(act, reason, settings):
    """The request's `done`: its text, usage and timings."""
    now = time.perf_counter()
    n = act.n_tokens
    # Decode rate after the first token (prompt processing is in ttft_ms); 0 below 2 tokens.
    tps = (n - 1) / (act.t_last - act.t_first) if n > 1 and act.t_last > act.t_first else 0.0
    admitted = act.t_admitted if act.t_admitted is not None else now
    return protocol.done_message(
        act.id,
        "".join(act.parts),
        reason,
        usage={
            "prompt_tokens": len(act.ids),
            "completion_tokens": n,
            "cached_tokens": act.cached,
            "dropped_messages": act.dropped,
        },
        timing={
            "queue_ms": _ms(max(0.0, admitted - act.t_received)),
            "ttft_ms": _ms(act.t_first - act.t_received) if act.t_first is not None else None,
            "total_ms": _ms(max(0.0, now - act.t_received)),
            "tokens_per_s": round(tps, 3),
        },
        model=settings.model,
        adapter=settings.adapter,
    )
