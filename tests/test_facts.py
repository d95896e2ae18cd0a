"""train/facts.py (key-fact matching, the repetition check) and the pure parts of
train/eval_model.py (declines, forgetting): logic only, no model.

The repetition check is calibrated on real greedy output kept in tests/fixtures/answers/:
loops.jsonl (SmolLM2-135M-Instruct and tiny-mistral looping) and not_loops.jsonl (their answers
that do not loop, fluent or word salad), labelled by reading them."""

import json
import math
from pathlib import Path

import pytest

from train import eval_model, facts, question_noise

ROOT = Path(__file__).resolve().parents[1]
ANSWERS = ROOT / "tests" / "fixtures" / "answers"
DAY = ["1 de abril", "1.º de abril", "primeiro de abril"]


def fixture(name):
    return [json.loads(line)["text"] for line in (ANSWERS / name).read_text(encoding="utf-8").splitlines()]


def sample_answers():
    return sorted(
        {
            m["content"]
            for f in sorted((ROOT / "data" / "sample").glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()
            for m in json.loads(line)["messages"]
            if m["role"] == "assistant"
        }
    )


# --------------------------------------------------------------------------- matching


def test_words_drop_accents_case_and_punctuation():
    assert facts.words("Estádio de SÃO LUÍS, em Faro!") == ["estadio", "de", "sao", "luis", "em", "faro"]
    assert facts.words("1.º de abril") == ["1", "o", "de", "abril"]  # º is a compatibility "o"
    assert facts.words("“Leões de Faro”") == ["leoes", "de", "faro"]
    assert facts.words("") == [] and facts.words("?!…") == []


def test_the_noised_questions_drop_accents_by_the_rule_eval_matches_by():
    # train/question_noise.py writes a fan's accent-less question with this function: its words
    # must be the words eval sees in the accented one, or a noised copy would be another question
    assert question_noise.strip_accents is facts.strip_accents
    for text in ("Estádio de São Luís", "Fundação em 1910: 1.º de abril", "ÇA, Ñandú, Ærø"):
        assert facts.words(facts.strip_accents(text)) == facts.words(text)
    assert facts.strip_accents("São Luís?") == "Sao Luis?"  # case and punctuation kept


@pytest.mark.parametrize(
    "answer, spellings, expected",
    [
        ("Foi fundado em 1910.", ["1910"], True),
        ("Foi fundado em 19100.", ["1910"], False),  # word boundary: a longer number is not the fact
        ("Foi fundado em 1910s", ["1910"], False),
        ("em1910", ["1910"], False),
        ("(1910)", ["1910"], True),
        ("Joga no Estadio de Sao Luis", ["São Luís"], True),  # accents ignored
        ("JOGA NO ESTÁDIO DE SÃO LUÍS", ["são luís"], True),  # case ignored
        ("Joga no São Luísinho", ["São Luís"], False),
        ("O Farense é de Faro", ["farenses"], False),  # singular club name is not the supporters' name
        ("Os adeptos são os farenses.", ["farenses"], True),
        ("fundado a primeiro de abril", DAY, True),  # any accepted spelling
        ("fundado a 1.º de Abril", DAY, True),
        ("fundado a 1 de abril", DAY, True),
        ("fundado a 11 de abril", DAY, False),
        ("fundado em abril", DAY, False),
        ("Leões de Faro", ["Leões de Faro"], True),
        ("Leões, de Faro", ["Leões de Faro"], True),  # punctuation between words is a boundary
        ("Leões do Faro", ["Leões de Faro"], False),  # the words in order, contiguous
        ("Faro de Leões", ["Leões de Faro"], False),
    ],
)
def test_contains(answer, spellings, expected):
    assert facts.contains(answer, spellings) is expected


def test_missing_names_each_absent_fact():
    named = [["1910"], DAY, ["Faro"]]
    assert facts.missing("Fundado a 1 de abril de 1910, em Faro.", named) == []
    assert facts.missing("Fundado em 1910.", named) == [DAY, ["Faro"]]


# --------------------------------------------------------------------------- loops


def test_every_real_loop_is_degenerate():
    loops = fixture("loops.jsonl")
    assert len(loops) >= 50
    missed = [t[:80] for t in loops if not facts.degenerate(t)]
    assert missed == []


def test_no_real_answer_that_does_not_loop_is_degenerate():
    answers = fixture("not_loops.jsonl") + sample_answers()
    assert len(answers) >= 70
    flagged = [
        (round(facts.repetition(t), 3), facts.repeated_run(t), t[:80]) for t in answers if facts.degenerate(t)
    ]
    assert flagged == []
    assert all(facts.repetition(a) == 0.0 for a in sample_answers())


def test_threshold_sits_in_the_gap_between_loops_and_answers():
    """Loops caught by the 3-gram rule sit well above the limit; fluent answers well below."""
    loops = [facts.repetition(t) for t in fixture("loops.jsonl") if facts.repeated_run(t) is None]
    answers = [facts.repetition(t) for t in fixture("not_loops.jsonl")]
    assert min(loops) >= facts.REPETITION_LIMIT + 0.05, min(loops)
    assert max(answers) <= facts.REPETITION_LIMIT - 0.05, max(answers)


def test_repetition_edges():
    assert facts.repetition("") == 0.0 and facts.repetition("um dois") == 0.0
    assert facts.repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert facts.repeated_run("em Faro. Faro. Faro.") == "faro"
    assert facts.repeated_run("o que o que o que") == "o que"
    assert facts.repeated_run("Faro, Faro e Lisboa") is None  # twice is not a loop


def test_a_loop_holding_the_fact_scores_zero():
    loop = "O Farense joga no Estádio de São Luís. São Luís. São Luís. São Luís. São Luís."
    assert facts.contains(loop, ["São Luís"])
    j = facts.judge(loop, [["São Luís"]])
    assert j["degenerate"] and not j["ok"] and j["missing"] == []
    good = facts.judge("O Farense joga em casa no Estádio de São Luís, em Faro.", [["São Luís"]])
    assert good == {"ok": True, "missing": [], "degenerate": False, "declined": False, "repetition": 0.0}


REFUSAL = ["não tenho essa informação", "não sei", "I don't know"]


def test_declining_an_answerable_question_is_wrong_even_holding_the_facts():
    decline = "Não tenho essa informação. Consulte o site oficial do Sporting Clube Farense."
    j = facts.judge(decline, [["Sporting Clube Farense"]], REFUSAL)
    assert j["declined"] and not j["ok"] and j["missing"] == []
    assert facts.judge(decline, [["Sporting Clube Farense"]])["ok"]  # without refusals: facts only
    # on an out-of-scope question (its facts are the refusal's) the decline is the right answer
    assert facts.refuses([REFUSAL], REFUSAL) and facts.refuses([["NAO SEI"]], REFUSAL)
    assert not facts.refuses([["1910"]], REFUSAL)
    assert facts.judge(decline, [REFUSAL], REFUSAL) == {
        "ok": True,
        "missing": [],
        "degenerate": False,
        "declined": False,
        "repetition": 0.0,
    }
    assert eval_model.refusals({"out_of_scope": [([], [REFUSAL]), ([], [["não sei"]])]}) == sorted(REFUSAL)
    assert eval_model.refusals({}) == []


def test_summarise_and_judge_all_skip_unnamed():
    answers = ["Em 1910.", "Não sei.", "1910 1910 1910 1910", "Olá!"]
    named = [[["1910"]], [["1910"]], [["1910"]], None]
    judgements, summary = eval_model.judge_all(answers, named)
    assert [j and j["ok"] for j in judgements] == [True, False, False, None]
    assert summary == {
        "correct": 1,
        "of": 3,
        "accuracy": pytest.approx(1 / 3),
        "degenerate": 1,
        "declined": 0,
    }
    _, summary = eval_model.judge_all(answers, named, REFUSAL)
    assert (summary["correct"], summary["declined"]) == (
        1,
        1,
    )  # "Não sei." declined a question the data answers
    assert facts.summarise([]) == {"correct": 0, "of": 0, "accuracy": 0.0, "degenerate": 0, "declined": 0}


def test_declines_counts_inventions():
    decline = [["não tenho essa informação", "não sei", "I don't know"]]
    answers = [
        "Não tenho essa informação. Consulte o site oficial.",
        "I don't know.",
        "O Liverpool ganhou a Liga dos Campeões em 2019.",  # invents
        "Não sei não sei não sei não sei",  # a loop does not decline
    ]
    _, summary = eval_model.declines(answers, [decline] * 4, decline[0])
    assert summary == {"declined": 2, "invented": 2, "of": 4, "invention_rate": 0.5, "degenerate": 1}


def test_forgetting_flag():
    flag = lambda b, t: eval_model.forgetting({"perplexity": b}, {"perplexity": t})["flagged"]  # noqa: E731
    assert not flag(10.0, 11.4) and not flag(10.0, 11.5) and flag(10.0, 11.6)
    assert not flag(10.0, 5.0) and flag(10.0, math.inf) and flag(10.0, math.nan)
