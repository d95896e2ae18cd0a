"""The one prompt rendering, shared by training, evaluation and the worker.

Everything that turns a conversation into token ids goes through here, so the worker sends the
model exactly the prefix it was trained on. Four rules:

1. The system prompt sits at a fixed place at the start. A template that keeps a leading
   system message at the start (ChatML, Llama 3) gets it as a system message; one that rejects
   it (Mistral v0.1/v0.2), drops it or moves it (Mistral v0.3 puts it in front of the *last*
   user message, so it would move on every turn and be missing from training sequences) gets it
   folded into the first user turn as "system\\n\\nuser". So the served prompt of every turn is a
   token prefix of the next turn's, and of the training sequence.
   A template that writes a system prompt of its own when a conversation has none (SmolLM2:
   "You are a helpful AI assistant named SmolLM, trained by Hugging Face"; see
   template_default_system) keeps doing so when no system prompt is configured - in training and
   serving alike, so they still agree; a configured one (train/config.yaml's system_prompt, the
   club's) is given as the system message and replaces it.
2. Message content is text. "[INST]", "</s>", "<s>", "[TOOL_CALLS]" typed by a user are
   tokenized as the characters they are; only the template's own markup produces control ids.
3. A training example is the served prompt followed by the tokens of the answer the template
   writes (answer + end of turn); if the prompt is not a prefix of the rendered conversation,
   encoding stops with PromptError instead of guessing.
4. Each assistant turn is tokenized apart from the prompt served before it: the model starts
   writing where that prompt ends, and a byte-level BPE (SmolLM2's) would otherwise merge across
   that point ("assistant\\n" + "  Sim" gives "\\n " + " Sim" read whole, "\\n" + " " + " Sim"
   as served), so the served prompt would not be a token prefix of the training sequence or of
   the next turn's prompt.
"""

import re
from dataclasses import dataclass

SYSTEM_FOLD_SEPARATOR = "\n\n"
TRAIN_ON = ("last", "all_assistant")

# Control-token strings of the common chat formats, for reporting data that contains them
# (prepare_data has no tokenizer); encoding protects every special token of the tokenizer itself.
CONTROL_STRING_RE = re.compile(
    r"</?s>|<unk>|\[/?INST\]|\[TOOL_CALLS\]|\[/?AVAILABLE_TOOLS\]|\[/?TOOL_RESULTS\]|\[control_\d+\]"
    r"|\[/?SYSTEM_PROMPT\]|<\|[a-z_]+\|>"
    # SmolLM2's (StarCoder's) other control tokens
    r"|<(?:repo_?name|file_sep|filename|gh_stars|issue_(?:start|comment|closed)|jupyter_(?:start|text|code|output|script)|empty_output)>"
)

# Unique markers for the system-role probe: text no template produces or tests for.
_PROBE = {
    "system": "\u27e6probe-system-5f1c\u27e7",
    "user": "\u27e6probe-user-9a2e\u27e7",
    "assistant": "\u27e6probe-answer-c47b\u27e7",
    "user2": "\u27e6probe-user-b803\u27e7",
}


class PromptError(ValueError):
    """A conversation this tokenizer's template cannot turn into a consistent training example."""


def with_system_prompt(messages, system_prompt):
    """Add the configured system prompt to a conversation that has none."""
    messages = list(messages)
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def fold_system(messages):
    """Merge system messages into the first user turn: 'system\\n\\nuser'."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    rest = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
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
    """mlx-lm wraps the Hugging Face tokenizer; templates live on the inner one. (A Hugging
    Face tokenizer's own _tokenizer is its Rust backend, which has no template.)"""
    inner = getattr(tokenizer, "_tokenizer", None)
    return inner if hasattr(inner, "apply_chat_template") else tokenizer


@dataclass
class _Info:
    """What rendering needs to know about one tokenizer and template, worked out once."""

    template: str
    system_at_start: bool
    special_re: re.Pattern
    special_ids: dict
    text_first: object  # tokenizers.Tokenizer treating specials as text (start of input)
    text_after: object  # the same for text that follows a special token


def _info(hf):
    info = getattr(hf, "_farense_prompt_info", None)
    if info is None or info.template != hf.chat_template:
        info = _build_info(hf)
        hf._farense_prompt_info = info
    return info


def _build_info(hf):
    specials = sorted(
        {t.content for t in hf.added_tokens_decoder.values() if t.special} | set(hf.all_special_tokens),
        key=len,
        reverse=True,
    )
    ids = {s: hf.convert_tokens_to_ids(s) for s in specials}
    first, after = _text_tokenizers(hf)
    return _Info(
        hf.chat_template,
        _system_at_start(hf),
        re.compile("|".join(map(re.escape, specials))) if specials else None,
        ids,
        first,
        after,
    )


def _text_tokenizers(hf):
    """Copies of the fast tokenizer that read special-token strings as plain text.

    A special token splits the input; the text after it is tokenized on its own, and a
    Metaspace pre-tokenizer with prepend_scheme "first" adds its dummy prefix only to the text
    at the very start. The second copy reproduces that for text that follows a special token."""
    import orjson
    from tokenizers import Tokenizer

    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return None, None
    spec = orjson.loads(backend.to_str())
    first = Tokenizer.from_str(orjson.dumps(spec).decode())
    _prepend_never(spec.get("pre_tokenizer"))
    after = Tokenizer.from_str(orjson.dumps(spec).decode())
    for t in (first, after):
        t.encode_special_tokens = True
    return first, after


def _prepend_never(node):
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
            node["prepend_scheme"] = "never"
        for child in node.get("pretokenizers", []):
            _prepend_never(child)


def _system_at_start(hf):
    """Whether the template writes a leading system message before the first user turn and
    keeps it there (probed with unique markers, with and without a later turn)."""
    p = _PROBE
    conversations = [
        [{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user"]}],
        [
            {"role": "system", "content": p["system"]},
            {"role": "user", "content": p["user"]},
            {"role": "assistant", "content": p["assistant"]},
            {"role": "user", "content": p["user2"]},
        ],
    ]
    for messages in conversations:
        try:
            text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            return False
        if text.count(p["system"]) != 1 or text.find(p["system"]) > text.find(p["user"]):
            return False
    return True


def accepts_system_role(tokenizer):
    return _info(_hf(tokenizer)).system_at_start


def template_default_system(tokenizer):
    """The system prompt the template writes on its own when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), or None. Found by
    rendering a probe with and without a system message: the text the template puts where the
    probe's system prompt was."""
    hf = _hf(tokenizer)
    if not accepts_system_role(tokenizer):
        return None
    p = _PROBE
    user = [{"role": "user", "content": p["user"]}]
    with_system = hf.apply_chat_template([{"role": "system", "content": p["system"]}] + user, tokenize=False)
    without = hf.apply_chat_template(user, tokenize=False)
    before, after = with_system.split(p["system"])
    if without.startswith(before) and without.endswith(after) and len(without) > len(before) + len(after):
        return without[len(before) : len(without) - len(after)]
    return None


def _normalize(hf, messages):
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    roles = [m["role"] for m in messages]
    if "system" in roles:
        keep = _info(hf).system_at_start and roles.count("system") == 1 and roles[0] == "system"
        if not keep:
            messages = fold_system(messages)
    return messages


def render(tokenizer, messages, add_generation_prompt):
    """The conversation as the model sees it, as text (chat template applied)."""
    hf = _hf(tokenizer)
    return hf.apply_chat_template(
        _normalize(hf, messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_conversation(tokenizer, messages, add_generation_prompt):
    """Token ids of the rendered conversation: message content tokenized as plain text (rule 2),
    each assistant turn's text tokenized apart from the prompt served before it (rule 4)."""
    hf = _hf(tokenizer)
    info = _info(hf)
    hidden, restore = _hide(info, _normalize(hf, messages))
    text = hf.apply_chat_template(hidden, tokenize=False, add_generation_prompt=add_generation_prompt)
    cuts = _turn_starts(hf, hidden, text)
    if restore is None and not cuts:
        return hf.encode(text, add_special_tokens=False)
    return _encode_runs(hf, info, text, cuts, restore or (lambda run: run))


def _hide(info, messages):
    """The messages with each special-token string in their content replaced by a numbered
    placeholder, so that only the template's own markup matches the special tokens; and the
    function that puts the strings back into a piece of the rendered text (None: nothing hidden)."""
    texts = "".join(m["content"] for m in messages)
    if info.special_re is None or not info.special_re.search(texts):
        return messages, None
    mark = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in texts)
    found = []

    def hide(match):
        found.append(match.group(0))
        return f"{mark}{len(found) - 1}{mark}"

    hidden = [dict(m, content=info.special_re.sub(hide, m["content"])) for m in messages]
    placeholder = re.compile(f"{mark}(\\d+){mark}")
    return hidden, lambda run: placeholder.sub(lambda m: found[int(m.group(1))], run)


def _turn_starts(hf, messages, text):
    """Where in `text` (the rendered conversation) each assistant turn begins: the length of the
    prompt served before it, where that prompt's text is a prefix of `text`."""
    starts = set()
    for i in range(1, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        try:
            served = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        except Exception:  # a template that cannot render the prefix: no cut there
            continue
        if 0 < len(served) < len(text) and text.startswith(served):
            starts.add(len(served))
    return sorted(starts)


def _encode_runs(hf, info, text, cuts, restore):
    """Split the rendered text at the template's special tokens and at `cuts`, and tokenize the
    text between them (placeholders restored) as text."""
    stops = [(c, c, None) for c in cuts]
    if info.special_re is not None:
        stops += [(m.start(), m.end(), info.special_ids[m.group(0)]) for m in info.special_re.finditer(text)]
    ids, pos = [], 0
    for begin, end, special in sorted(stops) + [(len(text), len(text), None)]:
        if begin > pos:
            ids += _encode_text(hf, info, restore(text[pos:begin]), at_start=pos == 0)
        if special is not None:
            ids.append(special)
        pos = max(pos, end)
    return ids


def _encode_text(hf, info, text, at_start):
    tokenizer = info.text_first if at_start else info.text_after
    if tokenizer is None:
        return hf.encode(text, add_special_tokens=False, split_special_tokens=True)
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_prompt(tokenizer, messages, system_prompt=None):
    """Token ids of a conversation to be answered (ends with a generation prompt)."""
    messages = with_system_prompt(messages, system_prompt)
    return encode_conversation(tokenizer, messages, add_generation_prompt=True)


def encode_example(tokenizer, messages, system_prompt=None):
    """Training ids for a conversation ending with an assistant turn, and the prompt length.

    The ids are exactly encode_prompt(messages[:-1]) - what the worker will send - followed by
    the tokens the template writes for the final answer, up to and including the end-of-turn
    token. Raises PromptError when the prompt is not a prefix of the whole conversation."""
    messages = with_system_prompt(messages, system_prompt)
    if not messages or messages[-1]["role"] != "assistant":
        raise PromptError("a training conversation must end with an assistant turn")
    prompt_ids = encode_conversation(tokenizer, messages[:-1], add_generation_prompt=True)
    full_ids = encode_conversation(tokenizer, messages, add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        n = next(i for i, (a, b) in enumerate(zip(prompt_ids, full_ids + [None] * len(prompt_ids))) if a != b)
        raise PromptError(
            f"the chat template's prompt is not a prefix of the conversation it starts (tokens differ "
            f"at position {n} of {len(prompt_ids)}): training on it would not match what is served"
        )
    return _cut_after_eos(tokenizer, full_ids, len(prompt_ids)), len(prompt_ids)


def _cut_after_eos(tokenizer, ids, start):
    """Drop what a template writes after the answer's end-of-sequence token (e.g. a space)."""
    eos = getattr(tokenizer, "eos_token_ids", None)
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    eos.add(_hf(tokenizer).eos_token_id)
    for i in range(len(ids) - 1, start - 1, -1):
        if ids[i] in eos:
            return ids[: i + 1]
    return ids


def encode_examples(tokenizer, messages, system_prompt=None, train_on="last"):
    """The training examples of one conversation: [(ids, prompt_len)].

    train_on="last": one example, the final answer. "all_assistant": one per assistant turn,
    each the conversation up to that answer, so every answer is trained with exactly the
    prefix that is served before it."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    messages = with_system_prompt(messages, system_prompt)
    ends = [len(messages)]
    if train_on == "all_assistant":
        ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    return [encode_example(tokenizer, messages[:end]) for end in ends]


# Rule 1 in Jinja, put in front of a template that moves or rejects the system message, for a
# model that leaves this project (the GGUF's tokenizer.chat_template: llama.cpp, Ollama, LM Studio
# render it themselves). KEEP: whether the template keeps one leading system message at the start.
_FOLD_PRELUDE = """\
{#- farense-lm: system messages folded into the first user turn, as in training -#}
{%- set fold = namespace(system=[], rest=[], done=false) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set fold.system = fold.system + [m['content']] -%}{%- endif -%}
{%- endfor -%}
{%- if fold.system and not (KEEP and fold.system | length == 1 and messages[0]['role'] == 'system') -%}
  {%- for m in messages -%}
    {%- if m['role'] == 'user' and not fold.done -%}
      {%- set fold.rest = fold.rest + [{'role': 'user', 'content': fold.system | join('SEP') + 'SEP' + m['content']}] -%}
      {%- set fold.done = true -%}
    {%- elif m['role'] != 'system' -%}
      {%- set fold.rest = fold.rest + [{'role': m['role'], 'content': m['content']}] -%}
    {%- endif -%}
  {%- endfor -%}
  {%- if not fold.done -%}
    {%- set fold.rest = [{'role': 'user', 'content': fold.system | join('SEP')}] + fold.rest -%}
  {%- endif -%}
  {%- set messages = fold.rest -%}
{%- endif -%}
"""


def standalone_template(tokenizer):
    """The tokenizer's chat template with rule 1 built in: any Jinja renderer given a conversation
    (system messages included) writes what `render` writes. For a model that leaves this project
    (a GGUF); rule 2 stays the caller's (a renderer that tokenizes its output reads "[INST]" in
    content as a control token). None when the tokenizer has no template."""
    hf = _hf(tokenizer)
    if not hf.chat_template:
        return None
    keep = "true" if _info(hf).system_at_start else "false"
    sep = SYSTEM_FOLD_SEPARATOR.encode("unicode_escape").decode()
    return _FOLD_PRELUDE.replace("KEEP", keep).replace("SEP", sep) + hf.chat_template


def control_strings(text):
    """The control-token strings (of the common chat formats) that occur in a text."""
    return CONTROL_STRING_RE.findall(text)
