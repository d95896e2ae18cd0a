"""Question noise (train/question_noise.py): noised copies of the training questions, the
answers untouched, seeded, never a near copy of an evaluation question; read by training and
`make show-data` through inputs.read_data; in the resume fingerprint only when a run has it."""

import random

import orjson
import pytest
from helpers_train import ROOT, prepare_data

from core.config import ConfigError, check_config, load_config
from train import eval_sets, question_noise
from train.inputs import read_data
from train.state import describe_changes, fingerprint, fingerprint_id

SYSTEM = {"role": "system", "content": "És o assistente."}


def conversation(question, answer="A resposta."):
    return [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_a_variant_deletes_or_swaps_words():
    question = "Em que estádio é que o Farense joga os jogos em casa?"
    norm = lambda s: [w.strip("?") for w in question_noise.strip_accents(s.lower()).split()]  # noqa: E731
    words = norm(question)
    for k in range(50):
        text = question_noise.noisy(question, random.Random(k))
        # a deletion keeps the words in order (with probability 0.85 each: sometimes all of
        # them); a swap keeps every word; both keep at least two
        got, in_order = norm(text), iter(words)
        assert all(w in in_order for w in got) or sorted(got) == sorted(words), text
        assert len(got) >= 2
    assert question_noise.noisy("Olá Farense", random.Random(0)) is None  # nothing to spare


def test_written_form_changes():
    assert question_noise.strip_accents("Qual é o estádio? Ça, São") == "Qual e o estadio? Ca, Sao"
    assert question_noise.drop_end_punctuation("Onde fica?! ") == "Onde fica"
    assert question_noise.delete_words(["a", "b"], random.Random(0)) == ["a", "b"]


def test_variants_are_seeded_new_and_leave_out_repeats_and_near_copies():
    convs = [conversation("Quando foi fundado o Sporting Clube Farense?", "Em 1910."), conversation("Olá?")]
    convs.append([SYSTEM, *conversation("Onde joga o clube de Faro em casa?")[1:], convs[0][1], convs[0][2]])
    a = question_noise.variants(convs, 3, seed=0)
    assert a == question_noise.variants(convs, 3, seed=0) and a != question_noise.variants(convs, 3, seed=1)
    assert {i for i, _ in a} == {0, 2}  # "Olá?" is too short
    questions = [m[-2]["content"] for _, m in a]
    assert len(set(questions)) == len(questions) and not set(questions) & {"Olá?", convs[0][1]["content"]}
    for i, messages in a:  # only the last question changes
        assert messages[:-2] == convs[i][:-2] and messages[-1] == convs[i][-1]
        assert messages[-2]["role"] == "user" and messages[-2]["content"] != convs[i][-2]["content"]
    assert question_noise.variants(convs, 3, 0, near_copy=lambda text: True) == []
    left = question_noise.variants(convs, 3, 0, near_copy=lambda text: text.islower())
    assert left == [(i, m) for i, m in a if not m[-2]["content"].islower()] and len(left) < len(a)


def test_the_sample_noised_as_the_demo_trains_on_it(tmp_path):
    """make data on data/sample, then read_data with question_noise 2: the validation split as it
    was, at most two variants per training conversation, none a near copy of an evaluation question
    (the rule make data applies), and the same variants on a second read."""
    data = prepare_data(tmp_path / "data")
    cfg = load_config(
        ROOT / "train" / "demo.yaml", {"data": str(data), "question_noise": 2, "question_noise_follow_ups": 0}
    )
    lines = []
    train, valid, _ = read_data(cfg, lines.append)
    plain = [orjson.loads(x)["messages"] for x in (data / "train.jsonl").read_bytes().splitlines()]
    added = train.conversations[len(plain) :]
    assert train.conversations[: len(plain)] == plain and 0 < len(added) <= 2 * len(plain)
    assert valid.conversations == [
        orjson.loads(x)["messages"] for x in (data / "valid.jsonl").read_bytes().splitlines()
    ]
    assert lines == [
        f"question noise: {len(added)} noised questions added to {len(plain)} conversations "
        "(2 per conversation at most; repeats and near copies of evaluation questions left out)"
    ]
    guard = eval_sets.Guard(eval_sets.load(data))
    assert max(guard.closest(m[-2]["content"])[0] for m in added) < eval_sets.NEAR_COPY
    assert all(train.where(len(plain) + k).startswith(f"{data / 'train.jsonl'}:") for k in range(len(added)))
    assert read_data(cfg, lambda _: None)[0].conversations == train.conversations
    assert train.info["count"] == len(plain) and train.info["noised"] == len(added)


def test_question_noise_enters_the_fingerprint_only_when_a_run_has_it():
    cfg = dict(load_config(None), model="m")
    t, v = {"path": "t", "count": 9, "sha256": "a" * 64}, {"path": "v", "count": 1, "sha256": "b" * 64}
    plain, noised = fingerprint(cfg, t, v, "h"), fingerprint(dict(cfg, question_noise=2), t, v, "h")
    assert "question_noise" not in plain["config"]
    assert describe_changes(plain, noised) == ["question_noise: null -> 2"]
    assert fingerprint_id(plain) != fingerprint_id(noised)


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_a_bad_question_noise_is_named(value):
    with pytest.raises(ConfigError, match="question_noise must be an integer >= 0"):
        check_config(load_config(None, {"question_noise": value}))


def test_follow_ups_ask_the_same_noised_question_after_another_exchange():
    """question_noise_follow_ups: the same variants (question and answer) as without, a share of
    them after another conversation's question and answer whose answer differs, after the system
    prompt; seeded; 0 and 1 are none and all."""
    convs = [
        conversation("Quando foi fundado o Sporting Clube Farense?", "Em 1910."),
        conversation("Qual é o ano de fundação do Farense?", "Em 1910."),
        conversation("Onde joga o Farense os jogos em casa?", "No São Luís."),
        conversation("Quais são as cores do Sporting Clube Farense?", "Preto e branco."),
    ]
    plain = question_noise.variants(convs, 4, seed=0)
    assert question_noise.variants(convs, 4, 0, follow_ups=0.0) == plain
    every = question_noise.variants(convs, 4, 0, follow_ups=1.0)
    assert [(i, m[-2:]) for i, m in every] == [(i, m[-2:]) for i, m in plain]
    exchanges = [c[-2:] for c in convs]
    for i, messages in every:
        assert messages[0] == SYSTEM and len(messages) == 5
        assert messages[1:3] in exchanges and messages[2]["content"] != convs[i][-1]["content"]
    half = question_noise.variants(convs, 4, 0, follow_ups=0.5)
    assert half == question_noise.variants(convs, 4, 0, follow_ups=0.5)
    assert [m[-2:] for _, m in half] == [m[-2:] for _, m in plain]
    asked_after = [len(m) == 5 for _, m in half]
    assert any(asked_after) and not all(asked_after)
    assert half != question_noise.variants(convs, 4, 1, follow_ups=0.5)


def test_a_data_set_of_one_answer_has_no_exchange_to_ask_after():
    convs = [conversation("Quando foi fundado o Sporting Clube Farense?", "Em 1910.")] * 2
    assert question_noise.earlier_exchange([c[-2:] for c in convs], [0, 1], random.Random(0)) == []
    others = [conversation(q)[-2:] for q in "abcde"]
    picks = {id(question_noise.earlier_exchange(others, [1, 3], random.Random(k))) for k in range(200)}
    assert picks == {id(others[0]), id(others[2]), id(others[4])}  # every other one, none of own
    assert all(len(m) == 3 for _, m in question_noise.variants(convs[:1], 3, 0, follow_ups=1.0))


def test_the_sample_asks_some_noised_questions_as_follow_ups(tmp_path):
    data = prepare_data(tmp_path / "data")
    cfg = load_config(
        ROOT / "train" / "demo.yaml",
        {"data": str(data), "question_noise": 2, "question_noise_follow_ups": 0.5},
    )
    lines = []
    train, _, _ = read_data(cfg, lines.append)
    plain = (data / "train.jsonl").read_bytes().count(b"\n")
    follow_ups = [m for m in train.conversations[plain:] if len(m) == 5]
    assert 0 < len(follow_ups) < len(train.conversations) - plain
    assert lines[0].endswith(f", {len(follow_ups)} of them asked after another exchange of the data)")
    assert all(m[1]["role"] == "user" and m[2]["role"] == "assistant" for m in follow_ups)


def test_follow_ups_enter_the_fingerprint_only_when_a_run_has_them():
    cfg = dict(load_config(None), model="m", question_noise=2)
    t, v = {"path": "t", "count": 9, "sha256": "a" * 64}, {"path": "v", "count": 1, "sha256": "b" * 64}
    plain, asked = (
        fingerprint(cfg, t, v, "h"),
        fingerprint(dict(cfg, question_noise_follow_ups=0.5), t, v, "h"),
    )
    assert "question_noise_follow_ups" not in plain["config"]
    assert describe_changes(plain, asked) == ["question_noise_follow_ups: null -> 0.5"]


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_a_bad_follow_up_share_is_named(value):
    with pytest.raises(ConfigError, match=r"question_noise_follow_ups must be a number in \[0, 1\]"):
        check_config(load_config(None, {"question_noise_follow_ups": value}))


def test_follow_ups_without_question_noise_are_noted():
    notes = check_config(load_config(None, {"question_noise_follow_ups": 0.5}))
    assert any("question_noise is 0: there are none" in n for n in notes)
    assert not any("follow_ups" in n for n in check_config(load_config(None, {"question_noise": 2})))
