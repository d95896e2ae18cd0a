"""The worker protocol (docs/PROTOCOL.md): request parsing and the response messages.

Pure functions, no mlx: `parse_line(bytes)` turns one input line into exactly one of
  None          a blank line (ignored),
  Generate      a valid generation request,
  Control       a valid control request (cancel, ping, stats, shutdown),
  ParseError    an error to answer (code, message, id or None),
and never raises. The fuzz tests in tests/test_protocol_parser.py hold it to that.

Every message the worker writes is built by one function at the end of this file
(ready_message, token_message, done_message, error_message, pong_message, stats_message),
so the response side of the protocol is read in one place, next to the request side.
"""

from dataclasses import dataclass, field

import orjson

from worker.context import OVERFLOW_POLICIES, TRUNCATE

# 2: the context-window policy (request `overflow`, usage.dropped_messages), done.model/adapter
PROTOCOL_VERSION = 2
MAX_DEPTH = 32  # nesting levels of a request, the top-level object included
ID_MAX_CHARS = 128
MAX_STOP_STRINGS = 16
CONTROL_OPS = ("cancel", "ping", "stats", "shutdown")

GENERATE_FIELDS = (
    "id",
    "messages",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop",
    "seed",
    "stream",
    "overflow",
)
CONTROL_FIELDS = ("op", "id")
ROLES = ("system", "user", "assistant")
SEED_MODULUS = 1 << 64


@dataclass(frozen=True)
class Generate:
    id: str
    messages: tuple[dict, ...]
    max_tokens: int | None = None  # None: the worker's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None  # already reduced to [0, 2**64)
    stream: bool = False
    overflow: str = TRUNCATE  # context-window policy: truncate | error
    received: float = field(default=0.0, compare=False)  # perf_counter() at arrival


@dataclass(frozen=True)
class Control:
    op: str
    id: str | None = None
    received: float = field(default=0.0, compare=False)


@dataclass(frozen=True)
class ParseError:
    code: str  # bad_json | invalid_request | too_large
    message: str
    id: str | None = None

    def to_message(self):
        return error_message(self.id, self.code, self.message)


class _Invalid(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


def too_large(n_bytes, limit):
    return ParseError("too_large", f"line of {n_bytes}+ bytes exceeds max_line_bytes ({limit})")


def valid_id(value):
    return isinstance(value, str) and 1 <= len(value) <= ID_MAX_CHARS


def parse_line(line, received=0.0):
    """One input line (bytes, without or with its '\\n') -> None | Generate | Control | ParseError."""
    try:
        return _parse_line(line, received)
    except Exception as e:  # the contract is "never raises": keep it even for a bug here
        return ParseError("bad_json", f"unparseable line ({type(e).__name__})")


def _parse_line(line, received):
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogatepass")
    line = bytes(line).rstrip(b"\r\n")
    if not line.strip(b" \t\r\n"):
        return None
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        return ParseError("bad_json", f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        return ParseError("bad_json", f"expected a JSON object, got {_json_type(obj)}")
    # Cheap bound first: a line with at most MAX_DEPTH brackets cannot nest deeper.
    deep = None
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH:
        deep = _too_deep_field(obj)
    if "op" in obj:
        return _parse_control(obj, deep, received)
    return _parse_generate(obj, deep, received)


def _json_type(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _too_deep_field(obj):
    """The first top-level key whose value nests beyond MAX_DEPTH levels in all, else None."""
    for key, value in obj.items():
        stack = [(value, 2)]  # the top-level object is level 1
        while stack:
            v, depth = stack.pop()
            if isinstance(v, (dict, list)):
                if depth > MAX_DEPTH:
                    return key
                children = v.values() if isinstance(v, dict) else v
                stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


def _name(key):
    """A field name as it may appear in a message: printable, bounded."""
    text = key if len(key) <= 64 else key[:64] + "..."
    return orjson.dumps(text).decode()[1:-1]


def _parse_control(obj, deep, received):
    unknown = [k for k in obj if k not in CONTROL_FIELDS]
    if unknown:
        return ParseError(
            "invalid_request",
            f"{_name(unknown[0])}: unknown field for a control request "
            f"(allowed: {', '.join(CONTROL_FIELDS)})",
        )
    if deep is not None:
        return ParseError("invalid_request", f"{_name(deep)}: nesting deeper than {MAX_DEPTH} levels")
    op = obj["op"]
    if not isinstance(op, str) or op not in CONTROL_OPS:
        return ParseError("invalid_request", f"op: must be one of {', '.join(CONTROL_OPS)}")
    rid = obj.get("id")
    if "id" in obj and not valid_id(rid):
        return ParseError("invalid_request", f"id: must be a string of 1-{ID_MAX_CHARS} characters")
    if op == "cancel" and rid is None:
        return ParseError("invalid_request", "id: required for cancel")
    return Control(op, rid, received)


def _parse_generate(obj, deep, received):
    if "id" not in obj:
        return ParseError("invalid_request", "id: required")
    rid = obj["id"]
    if not valid_id(rid):
        return ParseError("invalid_request", f"id: must be a string of 1-{ID_MAX_CHARS} characters")
    unknown = [k for k in obj if k not in GENERATE_FIELDS]
    if unknown:
        return ParseError("invalid_request", f"{_name(unknown[0])}: unknown field", rid)
    if deep is not None:
        return ParseError("invalid_request", f"{_name(deep)}: nesting deeper than {MAX_DEPTH} levels", rid)
    try:
        return _validate_generate(obj, rid, received)
    except _Invalid as e:
        return ParseError("invalid_request", e.message, rid)


def _integer(obj, key, minimum=None):
    if key not in obj:
        return None
    v = obj[key]
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or (isinstance(v, float) and not v.is_integer())
    ):
        raise _Invalid(f"{key}: must be an integer")
    v = int(v)
    if minimum is not None and v < minimum:
        raise _Invalid(f"{key}: must be >= {minimum}")
    return v


def _number(obj, key, low=None, high=None, low_open=False):
    if key not in obj:
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Invalid(f"{key}: must be a number")
    v = float(v)
    if low is not None and (v <= low if low_open else v < low):
        raise _Invalid(f"{key}: must be {'>' if low_open else '>='} {low:g}")
    if high is not None and v > high:
        raise _Invalid(f"{key}: must be <= {high:g}")
    return v


def _validate_generate(obj, rid, received):
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages and has_prompt:
        raise _Invalid("messages: give either messages or prompt, not both")
    if not has_messages and not has_prompt:
        raise _Invalid("messages: required (or prompt)")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise _Invalid("prompt: must be a string")
        messages = ({"role": "user", "content": prompt},)
    else:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise _Invalid("messages: must be a non-empty array of {role, content}")
        out = []
        for i, m in enumerate(raw):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise _Invalid(f"{where}: must be an object with role and content")
            for k in m:
                if k not in ("role", "content"):
                    raise _Invalid(f"{where}.{_name(k)}: unknown field")
            if "role" not in m:
                raise _Invalid(f"{where}.role: required")
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise _Invalid(f"{where}.role: must be one of {', '.join(ROLES)}")
            if "content" not in m:
                raise _Invalid(f"{where}.content: required")
            if not isinstance(m["content"], str):
                raise _Invalid(f"{where}.content: must be a string")
            out.append({"role": m["role"], "content": m["content"]})
        messages = tuple(out)

    stop = ()
    if "stop" in obj:
        s = obj["stop"]
        if isinstance(s, str):
            if not s:
                raise _Invalid("stop: must not be empty")
            stop = (s,)
        elif isinstance(s, list):
            if len(s) > MAX_STOP_STRINGS:
                raise _Invalid(f"stop: at most {MAX_STOP_STRINGS} strings")
            for i, x in enumerate(s):
                if not isinstance(x, str) or not x:
                    raise _Invalid(f"stop[{i}]: must be a non-empty string")
            stop = tuple(dict.fromkeys(s))
        else:
            raise _Invalid("stop: must be a string or an array of strings")

    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise _Invalid("stream: must be a boolean")

    overflow = obj.get("overflow", TRUNCATE)
    if not isinstance(overflow, str) or overflow not in OVERFLOW_POLICIES:
        raise _Invalid(f"overflow: must be one of {', '.join(OVERFLOW_POLICIES)}")

    seed = _integer(obj, "seed")
    return Generate(
        id=rid,
        messages=messages,
        max_tokens=_integer(obj, "max_tokens", minimum=1),
        temperature=_number(obj, "temperature", low=0.0),
        top_p=_number(obj, "top_p", low=0.0, high=1.0, low_open=True),
        top_k=_integer(obj, "top_k", minimum=0),
        min_p=_number(obj, "min_p", low=0.0, high=1.0),
        repetition_penalty=_number(obj, "repetition_penalty", low=0.0, low_open=True),
        stop=stop,
        seed=None if seed is None else seed % SEED_MODULUS,
        stream=stream,
        overflow=overflow,
        received=received,
    )


# ---------------------------------------------------------------------------- messages out
# One function per message type of docs/protocol.schema.json.


def ready_message(
    *,
    model,
    adapter,
    pid,
    max_tokens,
    max_tokens_cap,
    max_line_bytes,
    context_length,
    backend,
    blas,
    version,
    **extra,
):
    """The first line: the worker is loaded and warm. `extra`: further schema fields."""
    return {
        "type": "ready",
        "protocol": PROTOCOL_VERSION,
        "model": model,
        "adapter": adapter,
        "pid": pid,
        "max_tokens": max_tokens,
        "max_tokens_cap": max_tokens_cap,
        "max_line_bytes": max_line_bytes,
        "context_length": context_length,
        "backend": backend,
        "blas": blas,
        "version": version,
        **extra,
    }


def token_message(rid, text):
    return {"type": "token", "id": rid, "text": text}


def done_message(rid, text, finish_reason, usage, timing, model, adapter):
    """The terminal message of a generation. usage: prompt_tokens, completion_tokens,
    cached_tokens, dropped_messages; timing: queue_ms, ttft_ms, total_ms, tokens_per_s;
    model and adapter: what answered (they change across a client's reload)."""
    return {
        "type": "done",
        "id": rid,
        "text": text,
        "finish_reason": finish_reason,
        "usage": usage,
        "timing": timing,
        "model": model,
        "adapter": adapter,
    }


def error_message(rid, code, message):
    return {"type": "error", "id": rid, "code": code, "message": message}


def pong_message(rid):
    return {"type": "pong", "id": rid}


def stats_message(**fields):
    return {"type": "stats", **fields}
