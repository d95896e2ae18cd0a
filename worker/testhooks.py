"""Test-only hooks that change what the worker generates. Off unless their environment
variable is set (docs/PROTOCOL.md lists every WORKER_TEST_* hook); never set them in production.

WORKER_TEST_ECHO=TEXT: a request whose last message contains TEXT is answered with that
message's text: the answer's tokens as training would teach them (core.prompt.encode_example,
so control-token strings such as `[INST]` or `</s>` stay plain text), its end-of-sequence token
included, are forced one per step by a logits processor. They go through the real sampling,
detokenizing, stop-string and streaming code. Lets a test make the model write what it never
would by itself, e.g. HTML markup that a page must show as text
(examples/express/test/page.test.js). With WORKER_TEST_IGNORE_EOS the model goes on after it.
"""

import mlx.core as mx

from core.prompt import encode_example


def echo_processors(tokenizer, messages, processors=None):
    """`processors` plus one that forces the answer "the last message's text", token by token.
    `messages` is the conversation as prompted (system prompt included)."""
    echoed = [*messages, {"role": "assistant", "content": messages[-1]["content"]}]
    ids, prompt_len = encode_example(tokenizer, echoed)
    forced = ids[prompt_len:]
    step = 0

    def force(_tokens, logits):
        nonlocal step
        if step >= len(forced):
            return logits
        keep = mx.arange(logits.shape[-1]) == forced[step]
        step += 1
        return mx.where(keep, logits, -mx.inf)

    return [*(processors or []), force]
