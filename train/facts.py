"""Key facts: what an answer must contain to be right, and the repetition check that keeps a loop
from passing. Pure logic, no model.

A fact is a list of accepted spellings (a record's `facts` field, read by train/data_records.py:
["1910", ["1 de abril", "1.º de abril", "primeiro de abril"]] is two facts).
An answer contains a fact when the words of one of its spellings occur in the answer's words,
contiguous and in order. Words are compared after normalisation: Unicode compatibility
decomposition (NFKD) with the accents dropped, case folded, and every run of characters that
are not letters or digits a boundary. So "SAO LUIS" contains "São Luís", "19100" does not
contain "1910", and "Farense" does not contain "farenses".

An answer counts only when it contains every fact, does not decline a question the data answers
(judge's refusals), and is not degenerate, the mark of a greedy
loop ("O que é o que é o que é ...") that would otherwise pass by holding a keyword: more than
REPETITION_LIMIT of its word 3-grams repeat an earlier one (1 - distinct / total), or a run of 1 to
MAX_PERIOD words occurs RUN times in a row ("abril abril abril").
"""

import re
import unicodedata

# Calibrated in tests/test_facts.py on real greedy output (tests/fixtures/answers/): every answer
# of the sample data scores 0.0 and fluent model answers stay under 0.2; SmolLM2-135M's loops
# score 0.3 to 0.98, and a loop inside salad (tiny-mistral) is caught by the run rule.
REPETITION_LIMIT = 0.25
NGRAM = 3
RUN = 3
MAX_PERIOD = 8

KEY_FACT_RULE = (
    "an answer counts when it contains every fact (one accepted spelling of each, matched on whole "
    "words with case, accents and punctuation ignored), is not degenerate and, for a question the "
    "data answers, does not decline (hold a spelling of the out-of-scope set's refusal)"
)
DEGENERATE_RULE = (
    f"degenerate (a greedy loop): more than {REPETITION_LIMIT:.0%} of its word {NGRAM}-grams repeat "
    f"an earlier one (1 - distinct/total), or a run of 1 to {MAX_PERIOD} words occurs {RUN} times in a row"
)
INVENTS_RULE = (
    "an answer to an out-of-scope question invents unless it declines: it holds the set's decline "
    "facts (e.g. 'não tenho essa informação', 'não sei', 'I don't know') and is not degenerate"
)

_WORD = re.compile(r"[^\W_]+")


def strip_accents(text):
    """text without its combining marks ("São Luís" -> "Sao Luis"), composed (NFC) as the data is."""
    bare = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare)


def words(text):
    """The normalised words of a text: compatibility forms folded ("1º" -> "1o", "ﬁ" -> "fi"),
    accents dropped, case folded, punctuation a boundary."""
    return _WORD.findall(strip_accents(unicodedata.normalize("NFKC", text)).casefold())


def _holds(answer_words, spelling):
    target = words(spelling)
    n = len(target)
    return any(answer_words[i : i + n] == target for i in range(len(answer_words) - n + 1))


def contains(answer, spellings):
    """Whether the answer holds one of the fact's spellings (as whole words)."""
    answer_words = words(answer)
    return any(_holds(answer_words, s) for s in spellings)


def missing(answer, facts):
    """The facts (each a list of spellings) the answer does not contain."""
    answer_words = words(answer)
    return [fact for fact in facts if not any(_holds(answer_words, s) for s in fact)]


def repetition(text):
    """The share of word n-grams (n = NGRAM) that repeat an earlier one: 0.0 for text that never
    repeats itself, near 1.0 for a loop; 0.0 when the text has fewer than two n-grams."""
    w = words(text)
    grams = [tuple(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repeated_run(text):
    """The first run of 1 to MAX_PERIOD words that occurs RUN times back to back, or None."""
    w = words(text)
    for period in range(1, MAX_PERIOD + 1):
        for i in range(len(w) - RUN * period + 1):
            span = w[i : i + period]
            if all(w[i + k * period : i + (k + 1) * period] == span for k in range(1, RUN)):
                return " ".join(span)
    return None


def degenerate(text):
    return repetition(text) > REPETITION_LIMIT or repeated_run(text) is not None


def refuses(facts, refusals):
    """Whether facts are a refusal's: one of their spellings is a refusal spelling."""
    refusals = {" ".join(words(r)) for r in refusals}
    return any(" ".join(words(s)) in refusals for fact in facts for s in fact)


def judge(answer, facts, refusals=()):
    """{"ok", "missing", "degenerate", "declined", "repetition"} of one answer against its facts.

    refusals: the spellings of the data's decline reply (the out-of-scope set's facts). An answer
    to a question the data answers (facts that are not a refusal's) that holds one of them
    declined, and declining an answerable question is wrong even when the reply happens to hold
    the facts (a decline that names the club or its site)."""
    gone = missing(answer, facts)
    rep = repetition(answer)
    loop = rep > REPETITION_LIMIT or repeated_run(answer) is not None
    declined = bool(refusals) and not refuses(facts, refusals) and contains(answer, refusals)
    return {
        "ok": not gone and not loop and not declined,
        "missing": [fact[0] for fact in gone],
        "degenerate": loop,
        "declined": declined,
        "repetition": round(rep, 4),
    }


def summarise(judgements):
    """{"correct", "of", "accuracy", "degenerate", "declined"} over a list of judge() results."""
    n = len(judgements)
    correct = sum(j["ok"] for j in judgements)
    return {
        "correct": correct,
        "of": n,
        "accuracy": correct / n if n else 0.0,
        "degenerate": sum(j["degenerate"] for j in judgements),
        "declined": sum(j.get("declined", False) for j in judgements),
    }
