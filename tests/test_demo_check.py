"""train/demo_check.py, the end of `make demo`: worker replies judged by the key-fact rule."""

import argparse
import io

import pytest

from train import demo_check


def test_expect_parses_facts_and_spellings():
    assert demo_check.parse_expect("demo-2=São Luís|Sao Luis;Faro") == (
        "demo-2",
        [["São Luís", "Sao Luis"], ["Faro"]],
    )
    with pytest.raises(argparse.ArgumentTypeError, match="ID=FACT"):
        demo_check.parse_expect("demo-1")


def test_replies_are_echoed_and_judged():
    lines = [
        '{"type": "ready", "protocol": 2}\n',
        '{"type": "token", "id": "b", "text": "Joga"}\n',
        '{"type": "done", "id": "a", "text": "Foi fundado em 1910."}\n',
        '{"type": "done", "id": "b", "text": "Joga no Estádio Algarve."}\n',
        '{"type": "error", "id": "c", "code": "bad_request", "message": "prompt is empty"}\n',
        "not json\n",
    ]
    out = io.StringIO()
    answers = demo_check.read_replies(lines, out)
    assert out.getvalue() == "".join(lines)
    rows = demo_check.verdicts(
        answers, [("a", [["1910"]]), ("b", [["São Luís"]]), ("c", [["x"]]), ("d", [["y"]])]
    )
    assert [ok for _, ok, _ in rows] == [True, False, False, False]
    assert "missing São Luís" in rows[1][2]
    assert "error bad_request" in rows[2][2] and "no answer" in rows[3][2]


def test_a_loop_holding_the_fact_is_wrong():
    rows = demo_check.verdicts({"a": "1910 1910 1910 1910 1910"}, [("a", [["1910"]])])
    assert rows == [("a", False, "a: WRONG (a repetition loop): 1910 1910 1910 1910 1910")]
