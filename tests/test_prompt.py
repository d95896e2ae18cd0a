"""The one prompt rendering (core/prompt.py), checked over every chat-template fixture.

tests/fixtures/chat_templates/ holds the published templates: Mistral v0.3 (the users' model:
it moves the system prompt to the last user turn), the older v0.3 variant and v0.1/v0.2 (they
reject a system role), a Llama-3-style one and ChatML (they keep a leading system message). Each
is run on the tiny model's tokenizer, which is configured as Mistral v0.3's (dummy prefix, byte
fallback, control tokens at v0.3's ids).
"""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

TEMPLATES = sorted((ROOT / "tests" / "fixtures" / "chat_templates").glob("*.jinja"))
CONTROL = ["[INST]", "[/INST]", "</s>", "<s>", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[control_8]"]
WORDS = [
    "Olá",
    "Farense",
    "Faro",
    "estádio",
    "São",
    "Luís",
    "1910",
    "fundado",
    "quando",
    "é",
    "o",
    "clube",
    "leões",
    "preto",
    "branco",
    "?",
    "!",
    ",",
    "ção",
    "açúcar",
    "🦁",
]


@pytest.fixture(scope="module")
def hf(tiny_model):
    """The tokenizer as training and the worker get it: mlx-lm's wrapper around transformers'."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def set_template(tok, template):
    tok._tokenizer.chat_template = template
    return tok


def with_template(tok, path):
    return set_template(tok, Path(path).read_text(encoding="utf-8"))


def text(draw, min_words=1):
    words = draw(st.lists(st.sampled_from(WORDS), min_size=min_words, max_size=8))
    lead, trail = draw(st.sampled_from(["", " ", "  "])), draw(st.sampled_from(["", " ", "\n"]))
    return lead + " ".join(words) + trail


@st.composite
def conversations(draw):
    """1-4 turns of Portuguese text, with or without a system message, ending with an answer."""
    turns = draw(st.integers(1, 4))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": text(draw)})
    for _ in range(turns):
        messages.append({"role": "user", "content": text(draw)})
        messages.append({"role": "assistant", "content": text(draw)})
    return messages


PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@PROPERTY
@given(conv=conversations())
def test_served_prompt_is_the_masked_prefix_and_only_the_answer_is_trained(hf, template, conv):
    from core import prompt

    tok = with_template(hf, template)
    ids, n = prompt.encode_example(tok, conv)
    assert ids[:n] == prompt.encode_prompt(tok, conv[:-1])
    trained = ids[n:]
    answer = conv[-1]["content"].strip()
    assert answer in tok.decode(trained)
    # the answer and the template's end-of-turn markup, nothing of the earlier turns
    assert len(trained) <= len(tok.encode(answer, add_special_tokens=False)) + 12
    if "eos_token" in tok.chat_template:
        assert trained[-1] == tok.eos_token_id and tok.eos_token_id not in trained[:-1]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@PROPERTY
@given(conv=conversations())
def test_system_prompt_is_in_every_training_sequence_once_at_the_start(hf, template, conv):
    from core import prompt

    tok = with_template(hf, template)
    system = next((m["content"].strip() for m in conv if m["role"] == "system"), None)
    if system is None:
        return
    ids, n = prompt.encode_example(tok, conv)
    served = tok.decode(ids[:n])
    assert served.count(system) >= 1
    first_user = next(m["content"].strip() for m in conv if m["role"] == "user")
    assert served.find(system) <= served.find(first_user)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@PROPERTY
@given(conv=conversations())
def test_each_turns_prompt_extends_the_previous_one_for_the_prefix_cache(hf, template, conv):
    from core import prompt

    tok = with_template(hf, template)
    user_turns = [i for i, m in enumerate(conv) if m["role"] == "user"]
    prompts = [prompt.encode_prompt(tok, conv[: i + 1]) for i in user_turns]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later[: len(earlier)] == earlier


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@PROPERTY
@given(
    conv=conversations(),
    control=st.lists(st.sampled_from(CONTROL), min_size=1, max_size=4),
    where=st.integers(0, 10),
)
def test_control_strings_in_content_never_become_control_tokens(hf, template, conv, control, where):
    from core import prompt

    tok = with_template(hf, template)
    target = where % len(conv)
    injected = [dict(m) for m in conv]
    injected[target]["content"] = " ".join([injected[target]["content"]] + control + ["fim"])
    plain = [dict(m) for m in conv]
    plain[target]["content"] = " ".join([plain[target]["content"]] + ["x"] * len(control) + ["fim"])
    specials = set(tok.all_special_ids)
    ids, _ = prompt.encode_example(tok, injected)
    ref, _ = prompt.encode_example(tok, plain)
    assert sorted(i for i in ids if i in specials) == sorted(i for i in ref if i in specials)
    assert "".join(control).replace(" ", "") in tok.decode(ids).replace(" ", "")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
@PROPERTY
@given(conv=conversations())
def test_protected_encoding_equals_the_tokenizers_on_plain_text(hf, template, conv):
    """The path taken when content holds control strings tokenizes text exactly as the
    tokenizer does when it holds none (so protecting the text changes nothing else)."""
    from core import prompt

    tok = prompt._hf(with_template(hf, template))
    messages = prompt._normalize(tok, conv)
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert prompt._encode_protected(tok, prompt._info(tok), messages, False) == tok.encode(
        rendered, add_special_tokens=False
    )


def test_fifty_copies_of_each_control_string_add_at_least_100_prompt_tokens(hf):
    from core import prompt

    tok = with_template(hf, TEMPLATES[[p.stem for p in TEMPLATES].index("mistral-v0.3")])
    base = len(prompt.encode_prompt(tok, [{"role": "user", "content": "olá"}]))
    for s in CONTROL:
        ids = prompt.encode_prompt(tok, [{"role": "user", "content": "olá " + s * 50}])
        assert len(ids) - base >= 100, s


def test_mistral_v03_system_prompt_is_folded_into_the_first_turn(hf):
    from core import prompt

    tok = with_template(hf, ROOT / "tests/fixtures/chat_templates/mistral-v0.3.jinja")
    conv = [
        {"role": "system", "content": "Sê breve."},
        {"role": "user", "content": "Quem?"},
        {"role": "assistant", "content": "O Farense."},
        {"role": "user", "content": "Onde?"},
    ]
    assert not prompt.accepts_system_role(tok)
    assert (
        prompt.render(tok, conv, True)
        == "<s>[INST] Sê breve.\n\nQuem?[/INST] O Farense.</s>[INST] Onde?[/INST]"
    )


def test_a_template_that_drops_the_system_message_is_detected(hf):
    from core import prompt

    tok = set_template(
        hf,
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
        "[/INST]{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}",
    )
    assert not prompt.accepts_system_role(tok)  # the old probe looked for an "s", which "<s>" has
    text = prompt.render(
        tok, [{"role": "system", "content": "Sê breve."}, {"role": "user", "content": "Quem?"}], True
    )
    assert "Sê breve." in text


def test_a_template_whose_prompt_is_not_a_prefix_stops_with_file_and_line(hf, tmp_path):
    from train import batches

    set_template(
        hf,
        "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
        "{% else %}R:{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Resposta: {% endif %}",
    )
    data = tmp_path / "train.jsonl"
    data.write_text(
        '{"messages":[{"role":"user","content":"Quem?"},{"role":"assistant","content":"Nós."}]}\n\n'
        '{"messages":[{"role":"user","content":"Onde?"},{"role":"assistant","content":"Faro."}]}\n'
    )
    split = batches.read_split(data)
    with pytest.raises(ValueError, match=rf"{data}:1: the chat template's prompt is not a prefix"):
        batches.encode(hf, split.conversations, None, True, 512, "last", split.where)


def test_all_assistant_trains_every_answer_with_its_served_prefix(hf):
    from core import prompt

    tok = with_template(hf, ROOT / "tests/fixtures/chat_templates/mistral-v0.3.jinja")
    conv = [
        {"role": "user", "content": "Quem?"},
        {"role": "assistant", "content": "O Farense."},
        {"role": "user", "content": "Onde?"},
        {"role": "assistant", "content": "Em Faro."},
    ]
    last = prompt.encode_examples(tok, conv, "Sê breve.", "last")
    every = prompt.encode_examples(tok, conv, "Sê breve.", "all_assistant")
    assert len(last) == 1 and len(every) == 2 and every[-1] == last[0]
    ids, n = every[0]
    assert ids[:n] == prompt.encode_prompt(tok, conv[:1], "Sê breve.")
    assert tok.decode(ids[n:]) == "O Farense.</s>"
    with pytest.raises(ValueError, match="train_on"):
        prompt.encode_examples(tok, conv, None, "first")
