"""The end of `make demo`: read the worker's NDJSON replies on stdin, show them, and check that
each named request's answer holds its key facts (train/facts.py's rule, the one `make eval`
uses). Exit 1 naming the request and the missing fact, so a demo that ran but answers wrong
does not look like a success.

    printf '%s\\n' '{"id":"demo-1","prompt":"..."}' | python -m worker --adapter models/demo \\
      | python -m train.demo_check --expect 'demo-1=1910' --expect 'demo-2=São Luís|Sao Luis'

An --expect is `ID=FACT[;FACT...]`, each fact a `|`-separated list of accepted spellings.
"""

import argparse
import json
import sys

from train import facts


def parse_expect(text):
    """'id=a|b;c' -> ('id', [['a', 'b'], ['c']])."""
    rid, sep, spec = text.partition("=")
    if not sep or not rid or not spec.strip():
        raise argparse.ArgumentTypeError(f"--expect {text!r}: write ID=FACT[;FACT...], e.g. demo-1=1910")
    return rid, [[s.strip() for s in fact.split("|") if s.strip()] for fact in spec.split(";")]


def read_replies(lines, out):
    """{id: done text or error message} from the worker's lines, each echoed to out."""
    answers = {}
    for line in lines:
        out.write(line)
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("type") == "done":
            answers[msg.get("id")] = msg.get("text", "")
        elif msg.get("type") == "error" and msg.get("id") is not None:
            answers[msg["id"]] = f"error {msg.get('code')}: {msg.get('message')}"
    return answers


def verdicts(answers, expected):
    """[(id, ok, line)] for each expected request."""
    rows = []
    for rid, named in expected:
        if rid not in answers:
            rows.append((rid, False, f"{rid}: no answer from the worker"))
            continue
        verdict = facts.judge(answers[rid], named)
        why = ["missing " + ", ".join(verdict["missing"])] if verdict["missing"] else []
        why += ["a repetition loop"] if verdict["degenerate"] else []
        mark = "right" if verdict["ok"] else "WRONG (" + "; ".join(why) + ")"
        rows.append((rid, verdict["ok"], f"{rid}: {mark}: {answers[rid]}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect", type=parse_expect, action="append", default=[], metavar="ID=FACTS")
    args = parser.parse_args(argv)
    rows = verdicts(read_replies(sys.stdin, sys.stdout), args.expect)
    print("--- the worker's answers, checked for their key facts ---")
    for _, _, line in rows:
        print(line)
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
