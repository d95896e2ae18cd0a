"""The context-window policy: which turns of a conversation the model gets (docs/PROTOCOL.md).

A request's prompt plus its `max_tokens` must fit the context. With `overflow: "truncate"`
(the default) the oldest whole turns are left out until it fits, always keeping the leading
system message(s) and the last user turn (the last user message and anything after it); the
answer's `max_tokens` is then capped by the room left. `too_long` only when the system prompt
and the last user turn alone leave no room for one token. With `overflow: "error"` nothing is
left out: `too_long` when the whole prompt leaves no room for one token (protocol v1).

Pure logic: `fit` gets an `encode(messages) -> ids` function, so it is tested without mlx.
"""

from dataclasses import dataclass

TRUNCATE = "truncate"
ERROR = "error"
OVERFLOW_POLICIES = (TRUNCATE, ERROR)
LAST_TURN = "the system prompt and the last user turn alone"


@dataclass(frozen=True)
class Fitted:
    messages: list  # what the model gets
    ids: list  # their token ids
    dropped: int  # messages left out (0 when the conversation fits)
    max_tokens: int  # >= 1, capped by the room left in the context


class TooLong(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.message = message


def split_turns(messages):
    """(head, turns, last): head = the leading system messages; turns = whole earlier turns,
    oldest first, each a user message with the replies after it (a conversation may open with
    an assistant message: that is a turn of its own); last = the last user turn."""
    messages = list(messages)
    n_head = 0
    while n_head < len(messages) and messages[n_head]["role"] == "system":
        n_head += 1
    head, body = messages[:n_head], messages[n_head:]
    users = [i for i, m in enumerate(body) if m["role"] == "user"]
    if not users:
        return head, [], body
    starts = sorted({0, *users})
    turns = [body[a:b] for a, b in zip(starts, starts[1:] + [len(body)])]
    return head, turns[:-1], turns[-1]


def _conversation(head, turns, last):
    return head + [m for turn in turns for m in turn] + last


def fit(encode, messages, max_tokens, context_length, overflow=TRUNCATE):
    """Fitted for `messages` (with the system prompt already added), or raise TooLong."""
    ids = encode(messages)
    if not context_length or len(ids) + max_tokens <= context_length:
        return Fitted(list(messages), ids, 0, max_tokens)
    head, turns, last = split_turns(messages)
    if overflow == ERROR or not turns:
        return _capped(
            messages, ids, 0, max_tokens, context_length, "the prompt" if overflow == ERROR else LAST_TURN
        )
    # The fewest oldest turns to leave out so that prompt + max_tokens fits (binary search:
    # leaving out more turns never makes the prompt longer).
    lo, hi = 1, len(turns)
    best = None
    while lo <= hi:
        k = (lo + hi) // 2
        kept = _conversation(head, turns[k:], last)
        kept_ids = encode(kept)
        if len(kept_ids) + max_tokens <= context_length:
            best, hi = (k, kept, kept_ids), k - 1
        else:
            lo = k + 1
    if best is None:  # even the last turn alone leaves less than max_tokens
        kept = _conversation(head, [], last)
        best = (len(turns), kept, encode(kept))
    k, kept, kept_ids = best
    dropped = sum(len(t) for t in turns[:k])
    return _capped(kept, kept_ids, dropped, max_tokens, context_length, LAST_TURN)


def _capped(messages, ids, dropped, max_tokens, context_length, what):
    room = context_length - len(ids)
    if room < 1:
        raise TooLong(
            f"{what}: {len(ids)} tokens; the context holds {context_length} including at least 1 to generate"
        )
    return Fitted(list(messages), ids, dropped, max(1, min(max_tokens, room)))
