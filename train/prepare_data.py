"""Turn the user's Q&A files into mlx-lm chat data: DATA/train.jsonl, DATA/valid.jsonl,
DATA/split_report.json and the evaluation sets DATA/eval/*.jsonl.

    python -m train.prepare_data --config train/config.yaml --out data \
        [--raw data/raw] [--seed 0] [--valid-fraction 0.1] [--skip-invalid]

Reads every file under RAW (default data/raw; when it holds no data files, data/sample):
  .jsonl / .json (one object or an array) with records of one of these shapes
      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
      {"prompt": ..., "completion": ...}      {"question": ..., "answer": ...}
      {"pergunta": ..., "resposta": ...}      {"instruction": ..., "input": ..., "output": ...}
  .csv / .tsv with a header naming question/answer (or pergunta/resposta, prompt/completion)
      columns; the delimiter (; , or tab) is sniffed; UTF-8 with or without a BOM.
Any record may name the facts its (final) answer must contain, "facts": ["1910", ["1 de abril",
"primeiro de abril"]] (a JSON array in a CSV `facts` column): validated, checked against the
answer, and carried into train.jsonl/valid.jsonl for evaluation (train/facts.py).
RAW/eval/ holds the evaluation sets, never trained on (train/eval_sets.py): a training question
that is a near copy of one of theirs is an invalid record.

Every content is NFC-normalised and trimmed; the config's system_prompt is added to the
conversations without one; exact duplicates are removed before a seeded, deterministic split
(conversations sharing a prompt stay on the same side). An invalid record is reported as
`file:line: reason` and, unless --skip-invalid, nothing is written and the exit code is 1.
"""

import argparse
import random
import sys
from pathlib import Path

import orjson

from core import paths
from core.atomic import write_bytes
from core.config import ConfigError, check_config, load_config
from core.prompt import control_strings
from train import eval_sets
from train.data_readers import read_csv, read_json, read_jsonl
from train.data_records import (
    FACTS,
    Rejected,
    add_system_prompt,
    clean_text,
    record_to_example,
    record_to_messages,  # noqa: F401  (the public name tests use)
)

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
OUTPUT_FILES = ("train.jsonl", "valid.jsonl", "split_report.json")


class PrepareError(Exception):
    """A problem that stops the whole run (not one bad record)."""


def read_file(path):
    """(line, (messages, facts) | Rejected) for every record of one data file."""
    data = Path(path).read_bytes()
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        items = read_jsonl(data)
    elif suffix == ".json":
        items = read_json(data)
    else:
        items = read_csv(data, suffix)
    for line, item in items:
        if isinstance(item, Rejected):
            yield line, item
            continue
        try:
            yield line, record_to_example(item)
        except Rejected as e:
            yield line, e


# --------------------------------------------------------------------------- loading


def _display(path):
    """A path as the user would type it: relative to the current directory when inside it."""
    path = Path(path)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return str(path)
    return path.as_posix()


def list_files(folder):
    """(data files, unsupported files) under folder, sorted; dotfiles, dot-folders and the
    evaluation sets' folder (eval/) left out."""
    folder = Path(folder)
    if folder.is_file():
        candidates = [folder]
    else:
        candidates = sorted(
            (
                p
                for p in folder.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(folder).parts)
                and p.relative_to(folder).parts[0] != eval_sets.EVAL_DIR  # never trained on
            ),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
    data = [p for p in candidates if p.suffix.lower() in DATA_SUFFIXES]
    other = [p for p in candidates if p.suffix.lower() not in DATA_SUFFIXES]
    return data, other


def load_records(folder, system_prompt=None, warn=None, guard=None):
    """Read every data file under folder.

    Returns (conversations, rejected, per_file, facts): conversations is a list of message lists
    in file order (duplicates kept), rejected a list of {"file", "line", "reason"}, per_file a
    list of {"path", "records", "valid", "rejected"}, facts {conversation key: facts} for those
    that name facts (key: conversation_key). guard (an eval_sets.Guard) rejects a conversation
    whose question is a near copy of an evaluation question.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    files, unsupported = list_files(folder)
    for path in unsupported:
        warn(
            f"warning: {_display(path)}: skipped, unsupported file type "
            f"'{path.suffix or '(none)'}' (expected {', '.join(DATA_SUFFIXES)})"
        )
    system_prompt = clean_text(system_prompt) if system_prompt else None
    conversations, rejected, per_file, facts = [], [], [], {}
    for path in files:
        shown = _display(path)
        counts = {"path": shown, "records": 0, "valid": 0, "rejected": 0}
        for line, item in read_file(path):
            counts["records"] += 1
            if guard is not None and not isinstance(item, Rejected):
                try:
                    guard.check(item[0])
                except Rejected as e:
                    item = e
            if isinstance(item, Rejected):
                counts["rejected"] += 1
                rejected.append({"file": shown, "line": line, "reason": str(item)})
                continue
            messages, named = item
            counts["valid"] += 1
            conversations.append(add_system_prompt(messages, system_prompt))
            if named:
                key = conversation_key(conversations[-1])
                facts[key] = merge_facts(facts.get(key, []), named)
            _note_control_strings(messages, shown, line, counts)
        if counts["records"] == 0:
            warn(f"warning: {shown}: no records")
        per_file.append(counts)
    return conversations, rejected, per_file, facts


def conversation_key(messages):
    return orjson.dumps(messages)


def merge_facts(facts, more):
    """facts + the facts of `more` not already there (a duplicate conversation may name others)."""
    return facts + [f for f in more if f not in facts]


def _note_control_strings(messages, shown, line, counts):
    """Record a conversation whose text contains chat-format control strings ("[INST]", "</s>"...).
    They are trained as plain text (core/prompt.py), but are often a sign of text pasted from
    another model's prompt, so the report lists them."""
    found = sorted({s for m in messages for s in control_strings(m["content"])})
    if found:
        counts.setdefault("control_strings", []).append({"file": shown, "line": line, "strings": found})


def control_string_records(per_file):
    """Every {"file", "line", "strings"} noted by load_records, moved out of per_file."""
    return [r for counts in per_file for r in counts.pop("control_strings", [])]


def dedupe(conversations):
    """Exact duplicates removed; returns (unique conversations sorted canonically, count removed)."""
    unique = {}
    for messages in conversations:
        unique.setdefault(orjson.dumps(messages), messages)
    return [unique[k] for k in sorted(unique)], len(conversations) - len(unique)


def split(conversations, valid_fraction, seed):
    """Deterministic (train, valid): conversations sharing a prompt (everything but the last
    answer) stay together, so no prompt is in both parts; each part gets at least one."""
    groups = {}
    for messages in conversations:
        groups.setdefault(orjson.dumps(messages[:-1]), []).append(messages)
    if len(conversations) < 2:
        raise PrepareError(f"need at least 2 distinct conversations to split, found {len(conversations)}")
    if len(groups) < 2:
        raise PrepareError("need at least 2 distinct prompts to split; every conversation has the same one")
    order = [groups[k] for k in sorted(groups)]
    random.Random(seed).shuffle(order)
    target = min(max(1, round(len(conversations) * valid_fraction)), len(conversations) - 1)
    valid, taken = [], 0
    while taken < len(order) - 1 and len(valid) < target:
        valid.extend(order[taken])
        taken += 1
    train = [m for group in order[taken:] for m in group]
    return train, valid


def to_jsonl(conversations, facts=None):
    """One {"messages"[, "facts"]} line per conversation; facts: {conversation_key: facts}."""
    facts = facts or {}

    def line(messages):
        named = facts.get(conversation_key(messages))
        return orjson.dumps({"messages": messages, **({FACTS: named} if named else {})}) + b"\n"

    return b"".join(line(m) for m in conversations)


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.prepare_data", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        default=str(paths.CONFIG),
        help="YAML config (keys raw, seed, valid_fraction, system_prompt)",
    )
    p.add_argument(
        "--out", help="output folder for train.jsonl, valid.jsonl, split_report.json (default: config 'data')"
    )
    p.add_argument("--raw", help="folder (or file) with the input data (default: config 'raw', data/raw)")
    p.add_argument("--seed", type=int, help="shuffle seed (default: config 'seed', 0)")
    p.add_argument(
        "--valid-fraction", type=float, help="share of conversations for validation (default: config, 0.1)"
    )
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip invalid records (listed in the report) instead of failing",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, {"seed": args.seed, "valid_fraction": args.valid_fraction})
        check_config(cfg, keys=("seed", "valid_fraction", "system_prompt"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raw = Path(args.raw if args.raw is not None else cfg["raw"])
    out = Path(args.out if args.out is not None else cfg["data"])
    if not raw.exists():
        print(f"error: {_display(raw)}: no such folder", file=sys.stderr)
        return 1
    return prepare(data_source(raw), out, cfg, args.skip_invalid)


def prepare(source, out, cfg, skip_invalid=False):
    """Read, check, split and write; the exit status."""
    warn = lambda message: print(message, file=sys.stderr)  # noqa: E731
    evals = eval_sets.load(source, _display, warn)
    conversations, rejected, per_file, facts = load_records(
        source, cfg["system_prompt"], warn, eval_sets.Guard(evals)
    )
    rejected += evals.rejected
    controls = control_string_records(per_file)
    print_problems(rejected, controls)
    if rejected and not skip_invalid:
        print(
            f"error: {len(rejected)} invalid record(s); nothing written "
            "(fix them, or pass --skip-invalid / SKIP_INVALID=1 to leave them out)",
            file=sys.stderr,
        )
        return 1
    unique, duplicates = dedupe(conversations)
    try:
        train_set, valid_set = split(unique, cfg["valid_fraction"], cfg["seed"])
    except PrepareError as e:
        print(f"error: {e} (in {_display(source)})", file=sys.stderr)
        return 1
    named = lambda part: sum(conversation_key(m) in facts for m in part)  # noqa: E731
    report = {
        "source": _display(source),
        "files": per_file,
        "records": sum(f["records"] for f in per_file),
        "train": len(train_set),
        "valid": len(valid_set),
        "duplicates": duplicates,
        "rejected": rejected,
        "control_strings": controls,
        "seed": cfg["seed"],
        "valid_fraction": cfg["valid_fraction"],
        "system_prompt": cfg["system_prompt"],
        "facts": {"train": named(train_set), "valid": named(valid_set)},
        "eval_sets": {
            "files": evals.files,
            "counts": {name: len(items) for name, items in evals.sets.items()},
            "near_copy_threshold": eval_sets.NEAR_COPY,
        },
    }
    write_outputs(out, train_set, valid_set, report, facts, evals)
    return 0


def data_source(raw):
    """raw, or the bundled sample when raw holds no data files (said on stderr)."""
    if list_files(raw)[0]:
        return raw
    print(
        f"note: {_display(raw)} holds no data files ({', '.join(DATA_SUFFIXES)}); "
        f"using the sample data in {_display(paths.SAMPLE)}",
        file=sys.stderr,
    )
    return paths.SAMPLE


def print_problems(rejected, controls):
    for r in rejected:
        print(f"{r['file']}:{r['line']}: {r['reason']}", file=sys.stderr)
    for r in controls:
        print(
            f"warning: {r['file']}:{r['line']}: contains control-token text {', '.join(r['strings'])} "
            "(trained as plain text, never as control tokens)",
            file=sys.stderr,
        )


def write_outputs(out, train_set, valid_set, report, facts=None, evals=None):
    write_bytes(out / "train.jsonl", to_jsonl(train_set, facts))
    write_bytes(out / "valid.jsonl", to_jsonl(valid_set, facts))
    eval_sets.write(out, evals or eval_sets.EvalSets())
    write_bytes(out / "split_report.json", orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    sets = ", ".join(f"{n} {name}" for name, n in report.get("eval_sets", {}).get("counts", {}).items())
    print(
        f"{report['records']} records from {len(report['files'])} file(s) in {report['source']}: "
        f"{len(report['rejected'])} rejected, {report['duplicates']} duplicate(s) removed -> "
        f"{report['train']} train + {report['valid']} valid in {_display(out)} "
        f"(seed {report['seed']}, valid_fraction {report['valid_fraction']})"
        + (f"; evaluation sets in {_display(out / eval_sets.EVAL_DIR)}: {sets}" if sets else ""),
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
