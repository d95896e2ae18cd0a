"""One input record -> cleaned chat messages and the facts its answer must hold.

The record shapes train/prepare_data.py accepts (messages, prompt/completion, question/answer,
pergunta/resposta, instruction/input/output), cleaned (NFC, trimmed, Windows line ends folded),
and the optional `facts` field (train/facts.py): validated, and checked against the record's own
final answer, so that evaluation never scores a model against a fact the data does not state.
"""

import unicodedata

from train import facts as key_facts

ROLES = ("system", "user", "assistant")
# (question field, answer field) pairs, in the order they are tried.
PAIR_FORMATS = (("prompt", "completion"), ("question", "answer"), ("pergunta", "resposta"))
FACTS = "facts"


class Rejected(Exception):
    """One invalid record; the message is the reason."""


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


def clean_messages(messages, last="assistant"):
    """Validated, cleaned messages: [system], user, assistant, ... ending with role `last`."""
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
    if out[-1]["role"] != last:
        raise Rejected(
            f"'messages' does not end with {'an' if last == 'assistant' else 'a'} {last} turn (last role: {out[-1]['role']})"
        )
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
        return clean_messages(record["messages"])
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


def record_facts(record, answer):
    """The record's `facts` field, parsed ([[spelling, ...], ...]) and each found in the answer;
    None without the field. Rejected ("facts[1]: ...") when it is malformed or not in the answer."""
    value = _field(record, FACTS)
    if value is None:
        return None
    facts = parse_facts(value)
    for i, fact in enumerate(facts):
        if not key_facts.contains(answer, fact):
            shown = ", ".join(repr(s) for s in fact)
            raise Rejected(f"{FACTS}[{i}]: the answer holds none of its spellings ({shown})")
    return facts


def parse_facts(value, field=FACTS):
    """A facts field -> [[spelling, ...], ...] (NFC, trimmed); Rejected ("facts[1][0]: ...") names
    what is wrong. Each fact is one spelling or an array of accepted spellings."""
    if not isinstance(value, list):
        raise Rejected(f"{field}: not an array (found {_type_name(value)})")
    if not value:
        raise Rejected(f"{field}: empty (leave the field out when the answer names no fact)")
    facts = []
    for i, fact in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(fact, list):
            if not fact:
                raise Rejected(f"{where}: an empty array of spellings")
            facts.append([_spelling(s, f"{where}[{j}]") for j, s in enumerate(fact)])
        elif isinstance(fact, str):
            facts.append([_spelling(fact, where)])
        else:
            raise Rejected(f"{where}: not a string or an array of strings (found {_type_name(fact)})")
    return facts


def _spelling(value, where):
    if not isinstance(value, str):
        raise Rejected(f"{where}: not a string (found {_type_name(value)})")
    text = clean_text(value)
    if not text:
        raise Rejected(f"{where}: empty spelling")
    if not key_facts.words(text):
        raise Rejected(f"{where}: {value!r} has no letters or digits to match")
    return text


def _field(record, name):
    """record[name], the key matched case-insensitively (CSV headers), or None."""
    for key in record:
        if str(key).strip().lower() == name:
            return record[key]
    return None


def record_to_example(record):
    """(messages, facts or None) of one input record; Rejected when it is invalid."""
    messages = record_to_messages(record)
    return messages, record_facts(record, messages[-1]["content"])
