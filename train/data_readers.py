"""The data file formats: each reader yields (line, record) or (line, Rejected) in file order.

.jsonl          one JSON value per line
.json           one JSON value, or an array of them (line numbers of each element kept)
.csv / .tsv     a header row naming question/answer (or pergunta/resposta, prompt/completion)
                columns, optionally system and facts (a JSON array); the delimiter (; , or
                tab) is sniffed; UTF-8 with or without a BOM
"""

import csv
import io
import json
import unicodedata

from train.data_records import FACTS, PAIR_FORMATS, Rejected

CSV_DELIMITERS = (";", ",", "\t")


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
            yield row_line, _csv_record(row, header, q, a)
    except csv.Error as e:
        yield start, Rejected(f"CSV parse error: {e}")


def _csv_record(row, header, q, a):
    """One CSV row as a record; its facts cell, when there is one, read as JSON."""
    cell = lambda name: row[header.index(name)]  # noqa: E731
    record = {q: cell(q), a: cell(a)}
    if "system" in header:
        record["system"] = cell("system")
    if FACTS in header and cell(FACTS).strip():
        try:
            record[FACTS] = json.loads(cell(FACTS))
        except json.JSONDecodeError as e:
            return Rejected(f"{FACTS}: not JSON ({e.msg} at column {e.colno}); write it as a JSON array")
    return record
