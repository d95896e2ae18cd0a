"""The evaluation sets that sit beside the training data, and the check that keeps them unseen.

A data folder (data/raw, or the bundled data/sample) may hold an `eval/` folder, which is never
trained on:

    eval/paraphrases.jsonl    questions worded unlike the training questions, each with the facts
                              its answer must hold (key-fact accuracy: what a fan meets)
    eval/out_of_scope.jsonl   questions the data does not answer, each with the facts of the club's
                              decline reply (how often a model invents instead of declining)

A record is {"question": "...", "facts": [...]} or, for a follow-up, {"messages": [user,
assistant, ..., user], "facts": [...]}: the conversation so far, ending with the question to
answer; its facts are required and validated as a training record's are (train/data_records.py).

`make data` validates them, refuses a training question that is a near copy of one of theirs
(near_copy: character 3-gram Jaccard >= NEAR_COPY on normalised text), and writes them to
DATA/eval/NAME.jsonl, where evaluation and promotion find them.
"""

from dataclasses import dataclass, field
from pathlib import Path

import orjson

from core.atomic import write_bytes
from train import facts as key_facts
from train.data_readers import read_jsonl
from train.data_records import FACTS, Rejected, clean_messages, clean_text, parse_facts

EVAL_DIR = "eval"
SETS = ("paraphrases", "out_of_scope")
# A question at or above this similarity to an evaluation question is a near copy. Deliberate near
# copies of the sample questions (a typo, two words swapped, a greeting in front, "o Farense" for
# "o Sporting Clube Farense") score 0.56 and more; the frozen paraphrases score at most 0.475
# against the sample data (tests/test_eval_sets.py).
NEAR_COPY = 0.5
NGRAM = 3
QUESTION_KEYS = ("question", "pergunta", "prompt")


@dataclass
class Item:
    file: str
    line: int
    messages: list  # ends with the user turn to answer
    facts: list


@dataclass
class EvalSets:
    sets: dict = field(default_factory=dict)  # name -> [Item]
    rejected: list = field(default_factory=list)  # {"file", "line", "reason"}
    files: list = field(default_factory=list)  # {"path", "records", "valid", "rejected"}


# --------------------------------------------------------------------------- near copies


def _grams(text):
    padded = f" {' '.join(key_facts.words(text))} "
    return frozenset(padded[i : i + NGRAM] for i in range(len(padded) - NGRAM + 1))


def similarity(a, b):
    """Character 3-gram Jaccard of two texts after normalisation (accents, case and punctuation
    dropped, words joined by one space): 1.0 for the same words, 0.0 for nothing in common."""
    return _jaccard(_grams(a), _grams(b))


def _jaccard(x, y):
    return len(x & y) / len(x | y) if x | y else 1.0


def user_turns(messages):
    return [m["content"] for m in messages if m["role"] == "user"]


class Guard:
    """Refuses a training conversation whose question is a near copy of an evaluation question."""

    def __init__(self, eval_sets):
        self.questions = [
            (item, text, _grams(text))
            for items in eval_sets.sets.values()
            for item in items
            for text in user_turns(item.messages)
        ]

    def closest(self, text):
        """(similarity, item, question) of the evaluation question nearest to text, or None."""
        grams = _grams(text)
        best = max(
            ((_jaccard(grams, g), item, q) for item, q, g in self.questions), default=None, key=lambda x: x[0]
        )
        return best

    def near_copy(self, text):
        """(similarity, item, question) of the evaluation question text is a near copy of, or None."""
        best = self.closest(text)
        return best if best and best[0] >= NEAR_COPY else None

    def check(self, messages):
        for text in user_turns(messages):
            if best := self.near_copy(text):
                score, item, question = best
                raise Rejected(
                    f"question {text!r} is a near copy of {item.file}:{item.line} ({question!r}; similarity "
                    f"{score:.2f} >= {NEAR_COPY}): evaluation questions must stay out of training; reword one"
                )


# --------------------------------------------------------------------------- reading


def record_to_item(record):
    """(messages ending with a user turn, facts) of one evaluation record; Rejected otherwise."""
    if not isinstance(record, dict):
        raise Rejected("not a JSON object")
    if "messages" in record:
        messages = clean_messages(record["messages"], last="user")
    else:
        key = next((k for k in QUESTION_KEYS if k in record), None)
        if key is None:
            raise Rejected(f"expected 'question' (or 'messages' ending with a user turn) and '{FACTS}'")
        if not isinstance(record[key], str) or not clean_text(record[key]):
            raise Rejected(f"'{key}' is not a non-empty string")
        messages = [{"role": "user", "content": clean_text(record[key])}]
    if FACTS not in record:
        raise Rejected(f"missing '{FACTS}' (an evaluation question must name the facts its answer holds)")
    return messages, parse_facts(record[FACTS])


def load(folder, display=str, warn=None):
    """EvalSets of FOLDER/eval (empty when there is none)."""
    folder = Path(folder) / EVAL_DIR
    result = EvalSets()
    if not folder.is_dir():
        return result
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() == ".md":
            continue
        if path.suffix != ".jsonl" or path.stem not in SETS:
            if warn:
                warn(
                    f"warning: {display(path)}: skipped (evaluation sets: {', '.join(s + '.jsonl' for s in SETS)})"
                )
            continue
        shown = display(path)
        counts = {"path": shown, "records": 0, "valid": 0, "rejected": 0}
        items = result.sets.setdefault(path.stem, [])
        for line, record in read_jsonl(path.read_bytes()):
            counts["records"] += 1
            try:
                if isinstance(record, Rejected):
                    raise record
                items.append(Item(shown, line, *record_to_item(record)))
                counts["valid"] += 1
            except Rejected as e:
                counts["rejected"] += 1
                result.rejected.append({"file": shown, "line": line, "reason": str(e)})
        result.files.append(counts)
    return result


# --------------------------------------------------------------------------- prepared sets


def write(out, eval_sets):
    """OUT/eval/NAME.jsonl for each set ({"messages", "facts"} per line); a set the data no longer
    has is removed, so evaluation never scores a stale one. Returns {name: path}."""
    folder = Path(out) / EVAL_DIR
    written = {}
    for name in SETS:
        path = folder / f"{name}.jsonl"
        items = eval_sets.sets.get(name)
        if items:
            lines = (orjson.dumps({"messages": i.messages, FACTS: i.facts}) + b"\n" for i in items)
            write_bytes(path, b"".join(lines))
            written[name] = str(path)
        elif path.exists():
            path.unlink()
    return written


def read_prepared(data_dir):
    """{name: [(messages, facts)]} of DATA/eval/*.jsonl as `make data` wrote them."""
    sets = {}
    for name in SETS:
        path = Path(data_dir) / EVAL_DIR / f"{name}.jsonl"
        if path.is_file():
            rows = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
            sets[name] = [(r["messages"], r[FACTS]) for r in rows]
    return sets


def read_facts(path):
    """The facts of each conversation of a prepared train/valid file, in order (None: none named)."""
    rows = [orjson.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
    return [r.get(FACTS) for r in rows]
