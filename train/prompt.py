"""The one prompt-formatting function, shared by training, evaluation and the worker.

Everything that turns a conversation into token ids goes through here, so the worker sends
the model exactly the prefix it was trained on. Chat templates that reject a system role
(older Mistral ones raise "Conversation roles must alternate") get the system text folded
into the first user turn, the same way everywhere.
"""

from functools import lru_cache

SYSTEM_FOLD_SEPARATOR = "\n\n"


def with_system_prompt(messages, system_prompt):
    """Add the configured system prompt to a conversation that has none."""
    messages = list(messages)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def fold_system(messages):
    """Merge system messages into the first user turn: 'system\\n\\nuser'."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        text = SYSTEM_FOLD_SEPARATOR.join(system)
        for m in rest:
            if m["role"] == "user":
                m["content"] = text + SYSTEM_FOLD_SEPARATOR + m["content"]
                break
        else:
            rest.insert(0, {"role": "user", "content": text})
    return rest


def _hf(tokenizer):
    """mlx-lm wraps the Hugging Face tokenizer; templates live on the inner one."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


@lru_cache(maxsize=None)
def _accepts_system(hf_tokenizer):
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    try:
        text = hf_tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:
        return False
    # Some templates silently drop the system message; treat that as "rejects" too.
    return "s" in text.replace("u", "")


def accepts_system_role(tokenizer):
    return _accepts_system(_hf(tokenizer))


def render(tokenizer, messages, add_generation_prompt):
    """The conversation as the model sees it, as text (chat template applied)."""
    hf = _hf(tokenizer)
    if any(m["role"] == "system" for m in messages) and not _accepts_system(hf):
        messages = fold_system(messages)
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text):
    # The template already wrote the special tokens (BOS ...) as text.
    return _hf(tokenizer).encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, messages, system_prompt=None):
    """Token ids of a conversation to be answered (ends with a generation prompt)."""
    messages = with_system_prompt(messages, system_prompt)
    return encode(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


def encode_example(tokenizer, messages, system_prompt=None):
    """Training ids for a conversation ending with an assistant turn, and the prompt length.

    The ids start with exactly encode_prompt(messages[:-1]) - what the worker will send -
    followed by the tokens of the final answer, so training and serving agree token for token.
    """
    messages = with_system_prompt(messages, system_prompt)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant turn")
    prompt_text = render(tokenizer, messages[:-1], add_generation_prompt=True)
    full_text = render(tokenizer, messages, add_generation_prompt=False)
    prompt_ids = encode(tokenizer, prompt_text)
    full_ids = encode(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids, len(prompt_ids)
    # The answer's first token merged with the end of the prompt (no special token between
    # them). Keep the served prefix exact and tokenise the rest on its own.
    rest = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else ""
    if not rest:
        n = _common_prefix(prompt_ids, full_ids)
        return full_ids, n
    return prompt_ids + encode(tokenizer, rest), len(prompt_ids)


def _common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
