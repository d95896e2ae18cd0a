"""Turn the user's Q&A files into mlx-lm chat data: DATA/train.jsonl, DATA/valid.jsonl and
DATA/split_report.json.

    python -m train.prepare_data --config train/config.yaml --out data \
        [--raw data/raw] [--seed 0] [--valid-fraction 0.1] [--skip-invalid]

Reads every file under RAW (default data/raw; when it holds no data files, data/sample):
  .jsonl / .json (one object or an array) with records of one of these shapes
      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
      {"prompt": ..., "completion": ...}      {"question": ..., "answer": ...}
      {"pergunta": ..., "resposta": ...}      {"instruction": ..., "input": ..., "output": ...}
  .csv / .tsv with a header naming question/answer (or pergunta/resposta, prompt/completion)
      columns; the delimiter (; , or tab) is sniffed; UTF-8 with or without a BOM.

Every content is NFC-normalised and trimmed; the config's system_prompt is added to the
conversations without one; exact duplicates are removed before a seeded, deterministic split
(conversations sharing a prompt stay on the same side). An invalid record is reported as
`file:line: reason` and, unless --skip-invalid, nothing is written and the exit code is 1.
"""

import argparse
import csv
import io
import json
import random
import sys
import unicodedata
from pathlib import Path

import orjson

from core import paths
from core.atomic import write_bytes
from core.config import ConfigError, check_config, load_config
from core.prompt import control_strings

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
ROLES = ("system", "user", "assistant")
# (question field, answer field) pairs, in the order they are tried.
PAIR_FORMATS = (("prompt", "completion"), ("question", "answer"), ("pergunta", "resposta"))
CSV_DELIMITERS = (";", ",", "\t")
OUTPUT_FILES = ("train.jsonl", "valid.jsonl", "split_report.json")


class PrepareError(Exception):
    """A problem that stops the whole run (not one bad record)."""


class Rejected(Exception):
    """One invalid record; the message is the reason."""


# --------------------------------------------------------------------------- cleaning


def clean_text(text):
    """NFC, Windows line ends folded to \\n, outer whitespace trimmed."""
    text = unicodedata.normalize("NFC", text)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _type_name(value):
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def _text_field(record, key, label=None):
    """record[key] as cleaned, non-empty text; Rejected otherwise."""
    label = label or key
    value = record[key]
    if not isinstance(value, str):
        raise Rejected(f"'{label}' is not a string (found {_type_name(value)})")
    value = clean_text(value)
    if not value:
        raise Rejected(f"empty '{label}'")
    return value


def _pair(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def _clean_messages(messages):
    if not isinstance(messages, list):
        raise Rejected(f"'messages' is not an array (found {_type_name(messages)})")
    if not messages:
        raise Rejected("'messages' is empty")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Rejected(f"{where} is not an object (found {_type_name(message)})")
        if "role" not in message or "content" not in message:
            raise Rejected(f"{where} lacks 'role' or 'content' (keys: {_keys(message)})")
        role = message["role"]
        if role not in ROLES:
            raise Rejected(f"{where}: bad role {role!r} (expected system, user or assistant)")
        content = message["content"]
        if not isinstance(content, str):
            raise Rejected(f"{where}: content is not a string (found {_type_name(content)})")
        content = clean_text(content)
        if not content:
            raise Rejected(f"{where}: empty content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise Rejected(f"'messages' does not end with an assistant turn (last role: {out[-1]['role']})")
    # Mistral's chat template wants: [system], user, assistant, user, assistant, ...
    start = 1 if out[0]["role"] == "system" else 0
    for i in range(start, len(out)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if out[i]["role"] != expected:
            raise Rejected(
                f"messages[{i}]: expected role '{expected}', found '{out[i]['role']}' "
                "(after an optional leading system message, roles must alternate "
                "user/assistant)"
            )
    return out


def _keys(record):
    return ", ".join(sorted(map(str, record))) or "none"


def record_to_messages(record):
    """One input record (a dict from JSON/JSONL or a CSV row) -> cleaned chat messages."""
    if not isinstance(record, dict):
        raise Rejected(f"not a JSON object (found {_type_name(record)})")
    if "messages" in record:
        return _clean_messages(record["messages"])
    lower = {}
    for key in record:
        lower.setdefault(str(key).strip().lower(), key)
    system = None
    if "system" in lower and record[lower["system"]] not in (None, ""):
        system = _text_field(record, lower["system"], "system")
    for q, a in PAIR_FORMATS:
        if q in lower or a in lower:
            missing = a if q in lower else q
            if missing not in lower:
                raise Rejected(f"missing '{missing}' (keys: {_keys(record)})")
            return _pair(_text_field(record, lower[q], q), _text_field(record, lower[a], a), system)
    if "instruction" in lower or "output" in lower:
        missing = "output" if "instruction" in lower else "instruction"
        if missing not in lower:
            raise Rejected(f"missing '{missing}' (keys: {_keys(record)})")
        instruction = _text_field(record, lower["instruction"], "instruction")
        output = _text_field(record, lower["output"], "output")
        extra = record.get(lower["input"]) if "input" in lower else None
        if extra is not None and not isinstance(extra, str):
            raise Rejected(f"'input' is not a string (found {_type_name(extra)})")
        extra = clean_text(extra or "")
        return _pair(f"{instruction}\n\n{extra}" if extra else instruction, output, system)
    raise Rejected(
        f"unknown format (keys: {_keys(record)}); expected 'messages', "
        "prompt/completion, question/answer, pergunta/resposta or instruction/output"
    )


def add_system_prompt(messages, system_prompt):
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


# --------------------------------------------------------------------------- readers
# Each reader yields (line, record) or (line, Rejected) in file order.


def _utf8_error(data, err):
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return line, Rejected(f"invalid UTF-8 (byte 0x{data[err.start]:02x} at column {column})")


def read_jsonl(data):
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, Rejected(f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        if number == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as e:
            yield number, Rejected(f"invalid JSON: {e.msg} (column {e.colno})")


def read_json(data):
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        yield _utf8_error(data, e)
        return
    decoder = json.JSONDecoder()
    ws = " \t\n\r"
    line, counted = 1, 0  # line number at offset `counted`, counted incrementally

    def line_at(pos):
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def skip(pos):
        while pos < len(text) and text[pos] in ws:
            pos += 1
        return pos

    def bad(e):
        hint = " (several objects? name the file .jsonl)" if e.msg == "Extra data" else ""
        return e.lineno, Rejected(f"invalid JSON: {e.msg} (column {e.colno}){hint}")

    pos = skip(0)
    if pos == len(text):
        return
    if text[pos] != "[":
        try:
            value, end = decoder.raw_decode(text, pos)
            if skip(end) != len(text):
                raise json.JSONDecodeError("Extra data", text, skip(end))
        except json.JSONDecodeError as e:
            yield bad(e)
            return
        yield line_at(pos), value
        return
    pos = skip(pos + 1)
    if pos < len(text) and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                yield bad(e)
                return
            yield line_at(pos), value
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos = skip(pos + 1)
                break
            yield bad(json.JSONDecodeError("Expecting ',' delimiter or ']'", text, pos))
            return
    if pos != len(text):
        yield bad(json.JSONDecodeError("Extra data", text, pos))


def _header_columns(header):
    names = [unicodedata.normalize("NFC", h).strip().lstrip("\ufeff").strip().lower() for h in header]
    for q, a in PAIR_FORMATS:
        if q in names and a in names:
            return names, q, a
    return names, None, None


def sniff_delimiter(text, suffix):
    """The delimiter whose header row names known columns; else the commonest in line 1."""
    order = ("\t",) + CSV_DELIMITERS[:2] if suffix == ".tsv" else CSV_DELIMITERS
    first = text.split("\n", 1)[0]
    for d in order:
        try:
            header = next(csv.reader(io.StringIO(text, newline=""), delimiter=d), [])
        except csv.Error:
            continue
        if _header_columns(header)[1]:
            return d
    return max(order, key=first.count) if any(first.count(d) for d in order) else order[0]


def read_csv(data, suffix):
    try:
        text = data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        yield _utf8_error(data, e)
        return
    delimiter = sniff_delimiter(text, suffix)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, start = None, 1
    try:
        for row in reader:
            row_line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                names, q, a = _header_columns(row)
                if not q:
                    found = ", ".join(repr(n) for n in names)
                    yield (
                        row_line,
                        Rejected(
                            f"CSV header has no recognised columns (found {found}; expected "
                            f"question/answer or pergunta/resposta; delimiter {delimiter!r})"
                        ),
                    )
                    return
                header = names
                continue
            if len(row) > len(header) and not any(c.strip() for c in row[len(header) :]):
                row = row[: len(header)]
            if len(row) != len(header):
                yield (
                    row_line,
                    Rejected(
                        f"wrong number of cells: expected {len(header)}, "
                        f"found {len(row)} (delimiter {delimiter!r})"
                    ),
                )
                continue
            yield (
                row_line,
                {
                    q: row[header.index(q)],
                    a: row[header.index(a)],
                    **({"system": row[header.index("system")]} if "system" in header else {}),
                },
            )
    except csv.Error as e:
        yield start, Rejected(f"CSV parse error: {e}")


def read_file(path):
    """(line, messages | Rejected) for every record of one data file."""
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
            yield line, record_to_messages(item)
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
    """(data files, unsupported files) under folder, sorted; dotfiles and dot-folders ignored."""
    folder = Path(folder)
    if folder.is_file():
        candidates = [folder]
    else:
        candidates = sorted(
            (
                p
                for p in folder.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            ),
            key=lambda p: p.relative_to(folder).as_posix(),
        )
    data = [p for p in candidates if p.suffix.lower() in DATA_SUFFIXES]
    other = [p for p in candidates if p.suffix.lower() not in DATA_SUFFIXES]
    return data, other


def load_records(folder, system_prompt=None, warn=None):
    """Read every data file under folder.

    Returns (conversations, rejected, per_file): conversations is a list of message lists in
    file order (duplicates kept), rejected a list of {"file", "line", "reason"}, per_file a list
    of {"path", "records", "valid", "rejected"}.
    """
    warn = warn or (lambda message: print(message, file=sys.stderr))
    files, unsupported = list_files(folder)
    for path in unsupported:
        warn(
            f"warning: {_display(path)}: skipped, unsupported file type "
            f"'{path.suffix or '(none)'}' (expected {', '.join(DATA_SUFFIXES)})"
        )
    system_prompt = clean_text(system_prompt) if system_prompt else None
    conversations, rejected, per_file = [], [], []
    for path in files:
        shown = _display(path)
        counts = {"path": shown, "records": 0, "valid": 0, "rejected": 0}
        for line, item in read_file(path):
            counts["records"] += 1
            if isinstance(item, Rejected):
                counts["rejected"] += 1
                rejected.append({"file": shown, "line": line, "reason": str(item)})
            else:
                counts["valid"] += 1
                conversations.append(add_system_prompt(item, system_prompt))
                _note_control_strings(item, shown, line, counts)
        if counts["records"] == 0:
            warn(f"warning: {shown}: no records")
        per_file.append(counts)
    return conversations, rejected, per_file


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


def to_jsonl(conversations):
    return b"".join(orjson.dumps({"messages": m}) + b"\n" for m in conversations)


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
    source = data_source(raw)
    conversations, rejected, per_file = load_records(source, cfg["system_prompt"])
    controls = control_string_records(per_file)
    print_problems(rejected, controls)
    if rejected and not args.skip_invalid:
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
    }
    write_outputs(out, train_set, valid_set, report)
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


def write_outputs(out, train_set, valid_set, report):
    write_bytes(out / "train.jsonl", to_jsonl(train_set))
    write_bytes(out / "valid.jsonl", to_jsonl(valid_set))
    write_bytes(out / "split_report.json", orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print(
        f"{report['records']} records from {len(report['files'])} file(s) in {report['source']}: "
        f"{len(report['rejected'])} rejected, {report['duplicates']} duplicate(s) removed -> "
        f"{report['train']} train + {report['valid']} valid in {_display(out)} "
        f"(seed {report['seed']}, valid_fraction {report['valid_fraction']})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
