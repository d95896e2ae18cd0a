"""train/prepare_data.py: input formats, rejections with file:line, dedupe, split, report."""

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import prepare_data as pd  # noqa: E402

OUTPUTS = ("train.jsonl", "valid.jsonl", "split_report.json")


def run(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "train.prepare_data", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def jl(*records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def qa(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def load_one(tmp_path, name, text):
    """(conversations, rejected) of a single file, in-process."""
    folder = tmp_path / "in"
    write(folder / name, text)
    convs, rejected, per_file, _ = pd.load_records(folder)
    assert per_file[0]["records"] == len(convs) + len(rejected)
    return convs, rejected


# --------------------------------------------------------------------------- formats


def test_jsonl_messages_with_system_and_blank_lines(tmp_path):
    rec = {
        "messages": [
            {"role": "system", "content": "És o assistente."},
            {"role": "user", "content": "  Olá  "},
            {"role": "assistant", "content": "Olá!\n"},
        ]
    }
    convs, rejected = load_one(tmp_path, "a.jsonl", "\n" + jl(rec) + "   \n\n")
    assert rejected == []
    assert convs == [[{"role": "system", "content": "És o assistente."}] + qa("Olá", "Olá!")]


def test_json_single_object(tmp_path):
    convs, rejected = load_one(tmp_path, "a.json", json.dumps({"question": "Q?", "answer": "A."}))
    assert (convs, rejected) == ([qa("Q?", "A.")], [])


def test_json_array_of_mixed_shapes(tmp_path):
    text = json.dumps(
        [
            {"prompt": "P1", "completion": "C1"},
            {"messages": qa("M1", "R1")},
            {"pergunta": "Pe1", "resposta": "Re1"},
        ],
        ensure_ascii=False,
        indent=2,
    )
    convs, rejected = load_one(tmp_path, "a.json", text)
    assert rejected == []
    assert convs == [qa("P1", "C1"), qa("M1", "R1"), qa("Pe1", "Re1")]


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"prompt": "p", "completion": "c"}, qa("p", "c")),
        ({"question": "q", "answer": "a"}, qa("q", "a")),
        (
            {"pergunta": "Onde fica o estádio?", "resposta": "Em Faro."},
            qa("Onde fica o estádio?", "Em Faro."),
        ),
        ({"Pergunta": "q", "Resposta": "a"}, qa("q", "a")),
        (
            {"instruction": "Traduz", "input": "bom dia", "output": "good morning"},
            qa("Traduz\n\nbom dia", "good morning"),
        ),
        ({"instruction": "Diz olá", "output": "Olá"}, qa("Diz olá", "Olá")),
        ({"instruction": "Diz olá", "input": "", "output": "Olá"}, qa("Diz olá", "Olá")),
    ],
)
def test_record_shapes(record, expected):
    assert pd.record_to_messages(record) == expected


@pytest.mark.parametrize(
    "name, text",
    [
        (
            "semicolon.csv",
            "pergunta;resposta\nOnde joga o Farense?;No Estádio de São Luís, em Faro.\nCores?;Preto e branco.\n",
        ),
        (
            "comma.csv",
            'question,answer\nOnde joga o Farense?,"No Estádio de São Luís, em Faro."\nCores?,Preto e branco.\n',
        ),
        (
            "tabs.tsv",
            "Question\tAnswer\nOnde joga o Farense?\tNo Estádio de São Luís, em Faro.\nCores?\tPreto e branco.\n",
        ),
        (
            "bom.csv",
            "\ufeff Pergunta ; Resposta \r\nOnde joga o Farense?;No Estádio de São Luís, em Faro.\r\nCores?;Preto e branco.\r\n",
        ),
    ],
)
def test_csv_variants(tmp_path, name, text):
    convs, rejected = load_one(tmp_path, name, text)
    assert rejected == []
    assert convs == [
        qa("Onde joga o Farense?", "No Estádio de São Luís, em Faro."),
        qa("Cores?", "Preto e branco."),
    ]


def test_csv_quoted_cell_spanning_lines_and_line_numbers(tmp_path):
    text = 'pergunta;resposta\n"Primeira\nlinha";"Resposta\r\nem duas"\nSegunda;\n'
    convs, rejected = load_one(tmp_path, "multi.csv", text)
    assert convs == [qa("Primeira\nlinha", "Resposta\nem duas")]
    # the bad row starts on physical line 5, after a row spanning lines 2-4 (\r\n is one break)
    assert [(r["line"], r["reason"]) for r in rejected] == [(5, "empty 'resposta'")]


def test_nfc_and_trim(tmp_path):
    decomposed = unicodedata.normalize("NFD", "  Estádio de São Luís  ")
    convs, _ = load_one(tmp_path, "a.jsonl", jl({"question": decomposed, "answer": "\tSim. "}))
    assert convs == [qa("Estádio de São Luís", "Sim.")]
    assert unicodedata.is_normalized("NFC", convs[0][0]["content"])


# --------------------------------------------------------------------------- rejections

REJECT_CASES = [
    # (file name, content, expected (line, reason substring))
    ("a.jsonl", '{"question": "q", "answer": "a"}\n\n{"question": "q2", \n', (3, "invalid JSON: ")),
    ("a.jsonl", "[1, 2]\n", (1, "not a JSON object (found array)")),
    ("a.jsonl", '{"foo": 1, "bar": 2}\n', (1, "unknown format (keys: bar, foo)")),
    ("a.jsonl", '{"question": "q", "answer": "   "}\n', (1, "empty 'answer'")),
    ("a.jsonl", '{"pergunta": "", "resposta": "r"}\n', (1, "empty 'pergunta'")),
    ("a.jsonl", '{"instruction": "i", "output": ""}\n', (1, "empty 'output'")),
    ("a.jsonl", '{"question": "q"}\n', (1, "missing 'answer'")),
    (
        "a.jsonl",
        jl({"messages": qa("q", "a")[:1]}),
        (1, "does not end with an assistant turn (last role: user)"),
    ),
    (
        "a.jsonl",
        jl({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "a"}]}),
        (1, "messages[0]: bad role 'bot'"),
    ),
    (
        "a.jsonl",
        jl({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}),
        (1, "messages[0]: content is not a string (found number)"),
    ),
    (
        "a.jsonl",
        jl({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}),
        (1, "messages[1]: empty content"),
    ),
    ("a.jsonl", jl({"messages": [{"role": "assistant", "content": "a"}]}), (1, "expected role 'user'")),
    ("a.jsonl", jl({"question": ["q"], "answer": "a"}), (1, "'question' is not a string (found array)")),
    (
        "a.jsonl",
        b'{"question": "q", "answer": "a"}\n{"question": "\xff", "answer": "a"}\n',
        (2, "invalid UTF-8"),
    ),
    (
        "a.json",
        '[\n  {"question": "q", "answer": "a"},\n  {"question": "q2",\n   "answer": ""}\n]\n',
        (3, "empty 'answer'"),
    ),
    (
        "a.json",
        '[\n  {"question": "q", "answer": "a"},\n  {"question": "q2" "answer": "b"}\n]\n',
        (3, "invalid JSON: Expecting ',' delimiter"),
    ),
    ("a.json", '{"question": "q", "answer": "a"}\n{"question": "q", "answer": "a"}\n', (2, "Extra data")),
    ("a.json", '\n\n"just a string"', (3, "not a JSON object (found string)")),
    ("a.csv", "col1;col2\nq;a\n", (1, "CSV header has no recognised columns")),
    ("a.csv", "pergunta;resposta\nq;a\nq2;a2;extra\n", (3, "wrong number of cells: expected 2, found 3")),
    ("a.csv", "pergunta;resposta\nq;a\nsó uma\n", (3, "wrong number of cells: expected 2, found 1")),
    ("a.csv", "pergunta;resposta\nq;a\n;r\n", (3, "empty 'pergunta'")),
    ("a.csv", b"pergunta;resposta\nq;a\nq2;\xe9\n", (3, "invalid UTF-8")),
]


@pytest.mark.parametrize("name, text, expected", REJECT_CASES)
def test_rejection_reasons_in_process(tmp_path, name, text, expected):
    _, rejected = load_one(tmp_path, name, text)
    assert [(r["line"], expected[1] in r["reason"]) for r in rejected] == [(expected[0], True)], rejected


def test_every_rejection_reported_by_cli_and_nothing_written(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    expected = []
    for i, (name, text, (line, _reason)) in enumerate(REJECT_CASES):
        path = write(raw / f"{i:02d}_{name}", text)
        expected.append(f"{path}:{line}: ")
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(str(raw))]
    assert len(lines) == len(REJECT_CASES), result.stderr
    for prefix, (_, _, (_, reason)), line in zip(expected, REJECT_CASES, lines):
        assert line.startswith(prefix) and reason in line, (prefix, reason, line)
    assert not out.exists()


def test_unsupported_extension_is_a_warning(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(raw / "notes.txt", "not data")
    write(raw / ".hidden.jsonl", "garbage")
    write(raw / "a.jsonl", jl({"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}))
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "notes.txt" in result.stderr and "unsupported" in result.stderr
    assert ".hidden" not in result.stderr
    report = json.loads((out / "split_report.json").read_text())
    assert [f["path"] for f in report["files"]] == [f"{raw}/a.jsonl"]


# --------------------------------------------------------------------------- the whole job


def build_mixed_folder(raw):
    """All formats, a cross-file duplicate, one broken JSON line, one CSV row with an empty answer."""
    write(
        raw / "a_messages.jsonl",
        jl(
            {"messages": qa("Quando foi fundado o Farense?", "A 1 de abril de 1910.")},
            {"messages": qa("Qual é o estádio do Farense?", "O Estádio de São Luís, em Faro.")},
        )
        + '{"messages": [broken\n'  # line 3: invalid JSON
        + jl({"prompt": "Quais são as cores?", "completion": "Preto e branco."}),
    )
    write(
        raw / "b_object.json",
        json.dumps({"question": "Qual é a alcunha?", "answer": "Leões de Faro."}, ensure_ascii=False),
    )
    write(
        raw / "c_array.json",
        json.dumps(
            [
                {"pergunta": "Como se chamam os adeptos?", "resposta": "Farenses."},
                {
                    "instruction": "Responde em português",
                    "input": "De que cidade é o Farense?",
                    "output": "De Faro.",
                },
                {"instruction": "Que desporto pratica o clube?", "output": "Futebol."},
                # duplicate of a_messages.jsonl line 1 (different shape, same conversation after cleaning)
                {"question": " Quando foi fundado o Farense? ", "answer": "A 1 de abril de 1910."},
            ],
            ensure_ascii=False,
            indent=2,
        ),
    )
    write(
        raw / "d_semicolon.csv",
        "\ufeffPergunta;Resposta\n"
        "Onde fica Faro?;No Algarve.\n"
        "Como compro bilhetes?;\n"  # line 3: empty answer
        '"Posso ser\nsócio?";Sim, pelo site oficial.\n',
    )
    write(raw / "e_comma.csv", 'question,answer\nQual é a capital do Algarve?,"Faro, no sul."\n')
    write(
        raw / "f_tabs.tsv",
        "pergunta\tresposta\nHá loja oficial?\tSim; veja o site oficial.\n"
        "Qual é o estádio do Farense?\tO Estádio de São Luís, em Faro.\n",
    )


def test_done_criterion(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    build_mixed_folder(raw)

    failed = run("--raw", raw, "--out", out)
    assert failed.returncode != 0
    assert f"{raw}/a_messages.jsonl:3: invalid JSON" in failed.stderr
    assert f"{raw}/d_semicolon.csv:3: empty 'resposta'" in failed.stderr
    assert not out.exists()

    ok = run("--raw", raw, "--out", out, "--skip-invalid", "--valid-fraction", "0.3")
    assert ok.returncode == 0, ok.stderr
    report = json.loads((out / "split_report.json").read_text(encoding="utf-8"))
    train, valid = read_jsonl(out / "train.jsonl"), read_jsonl(out / "valid.jsonl")
    assert (report["train"], report["valid"]) == (len(train), len(valid))
    assert report["duplicates"] == 2
    assert sorted((r["file"], r["line"]) for r in report["rejected"]) == [
        (f"{raw}/a_messages.jsonl", 3),
        (f"{raw}/d_semicolon.csv", 3),
    ]
    total = sum(f["records"] for f in report["files"])
    assert total == 15 == report["records"]
    assert report["train"] + report["valid"] + report["duplicates"] + len(report["rejected"]) == total
    assert {f["path"]: (f["records"], f["valid"], f["rejected"]) for f in report["files"]} == {
        f"{raw}/a_messages.jsonl": (4, 3, 1),
        f"{raw}/b_object.json": (1, 1, 0),
        f"{raw}/c_array.json": (4, 4, 0),
        f"{raw}/d_semicolon.csv": (3, 2, 1),
        f"{raw}/e_comma.csv": (1, 1, 0),
        f"{raw}/f_tabs.tsv": (2, 2, 0),
    }
    assert (report["seed"], report["valid_fraction"], report["source"]) == (0, 0.3, str(raw))

    everything = [json.dumps(r, sort_keys=True) for r in train + valid]
    assert len(everything) == len(set(everything)) == 11
    questions = lambda rows: {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}  # noqa: E731
    assert not questions(train) & questions(valid)
    assert train and valid
    assert "Posso ser\nsócio?" in questions(train) | questions(valid)
    assert "Responde em português\n\nDe que cidade é o Farense?" in questions(train) | questions(valid)
    text = (out / "train.jsonl").read_text(encoding="utf-8") + (out / "valid.jsonl").read_text(
        encoding="utf-8"
    )
    assert "São Luís" in text or "sócio" in text  # UTF-8 kept, not \u escapes
    assert "\\u00" not in text


def test_deterministic_and_seed_dependent(tmp_path):
    raw = tmp_path / "raw"
    write(
        raw / "a.jsonl", jl(*({"question": f"Pergunta {i}?", "answer": f"Resposta {i}."} for i in range(40)))
    )
    outs = [tmp_path / name for name in ("one", "two", "three")]
    for out, seed in zip(outs, (7, 7, 8)):
        assert run("--raw", raw, "--out", out, "--seed", seed).returncode == 0
    for name in OUTPUTS:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert (outs[0] / "valid.jsonl").read_bytes() != (outs[2] / "valid.jsonl").read_bytes()
    assert len(read_jsonl(outs[0] / "valid.jsonl")) == 4


def test_split_independent_of_input_order():
    convs = [qa(f"q{i}", f"a{i}") for i in range(30)]
    a = pd.split(pd.dedupe(convs)[0], 0.2, 3)
    b = pd.split(pd.dedupe(list(reversed(convs)) + convs[:5])[0], 0.2, 3)
    assert a == b
    assert len(a[1]) == 6 and len(a[0]) == 24


def test_split_keeps_a_prompt_on_one_side():
    convs = [qa("mesma pergunta", f"resposta {i}") for i in range(5)] + [qa(f"q{i}", "a") for i in range(5)]
    for seed in range(10):
        train, valid = pd.split(pd.dedupe(convs)[0], 0.5, seed)
        assert not {m[0]["content"] for m in train} & {m[0]["content"] for m in valid}


@pytest.mark.parametrize("n, fraction", [(2, 0.1), (2, 0.9), (3, 0.01), (10, 0.99)])
def test_at_least_one_in_each_part(n, fraction):
    train, valid = pd.split([qa(f"q{i}", "a") for i in range(n)], fraction, 0)
    assert len(train) >= 1 and len(valid) >= 1 and len(train) + len(valid) == n


def test_too_few_conversations(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(raw / "a.jsonl", jl({"question": "q", "answer": "a"}, {"question": " q", "answer": "a "}))
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 1
    assert "at least 2" in result.stderr
    assert not out.exists()


def test_system_prompt_from_config(tmp_path):
    raw, out, cfg = tmp_path / "raw", tmp_path / "out", tmp_path / "config.yaml"
    write(cfg, "system_prompt: És o assistente do Sporting Clube Farense.\nseed: 3\n")
    write(
        raw / "a.jsonl",
        jl(
            {"question": "q1", "answer": "a1"},
            {"messages": [{"role": "system", "content": "Outro."}] + qa("q2", "a2")},
            {"question": "q3", "answer": "a3"},
        ),
    )
    result = run("--config", cfg, "--raw", raw, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "valid.jsonl")
    systems = sorted(r["messages"][0]["content"] for r in rows)
    assert all(r["messages"][0]["role"] == "system" for r in rows)
    assert systems == ["Outro."] + ["És o assistente do Sporting Clube Farense."] * 2
    assert json.loads((out / "split_report.json").read_text())["seed"] == 3


def test_fallback_to_sample(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(raw / ".gitkeep", "")
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "data/sample" in result.stderr and "no data files" in result.stderr
    report = json.loads((out / "split_report.json").read_text())
    assert report["source"] == "data/sample"
    assert report["train"] >= 1 and report["valid"] >= 1
    assert report["rejected"] == []


def test_sample_data_is_good():
    path = ROOT / "data" / "sample" / "farense_qa.jsonl"
    raw_lines = [
        line
        for f in sorted(path.parent.glob("*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]
    convs, rejected, _, named = pd.load_records(path.parent)
    assert rejected == [] and len(convs) >= 100
    assert len(named) >= len(convs) - 5  # every answer but the greetings names its facts
    assert len(set(raw_lines)) == len(raw_lines)
    assert all(unicodedata.is_normalized("NFC", line) for line in raw_lines)
    answers = [c[-1]["content"] for c in convs]
    assert len(set(answers)) < len(answers) / 2.5  # several paraphrases per fact


# --------------------------------------------------------------------------- facts


def fact_record(facts, answer="O Farense foi fundado a 1 de abril de 1910, em Faro."):
    return {"question": "Quando foi fundado o Farense?", "answer": answer, "facts": facts}


@pytest.mark.parametrize(
    "facts, reason",
    [
        ("1910", "facts: not an array (found string)"),
        ({"a": 1}, "facts: not an array (found object)"),
        ([], "facts: empty (leave the field out when the answer names no fact)"),
        ([1910], "facts[0]: not a string or an array of strings (found number)"),
        (["1910", []], "facts[1]: an empty array of spellings"),
        (["1910", ["1 de abril", None]], "facts[1][1]: not a string (found null)"),
        (["  "], "facts[0]: empty spelling"),
        (["1910", "?!"], "facts[1]: '?!' has no letters or digits to match"),
        (["1911"], "facts[0]: the answer holds none of its spellings ('1911')"),
        (["191"], "facts[0]: the answer holds none of its spellings ('191')"),  # whole words only
        (
            ["1910", ["2 de abril", "segundo de abril"]],
            "facts[1]: the answer holds none of its spellings ('2 de abril', 'segundo de abril')",
        ),
    ],
)
def test_bad_facts_are_rejected_with_file_line_and_field(tmp_path, facts, reason):
    raw, out = tmp_path / "raw", tmp_path / "out"
    good = fact_record(["1910"])
    write(
        raw / "a.jsonl",
        jl(good, {**fact_record(facts), "question": "E o ano?"}, {"question": "q", "answer": "a"}),
    )
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 1
    assert f"{raw}/a.jsonl:2: {reason}\n" in result.stderr
    assert not out.exists()


def test_facts_in_every_format_travel_into_the_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write(
        raw / "a.jsonl",
        jl(
            fact_record(["1910", ["1 de abril", "primeiro de abril"]]),
            {"messages": qa("Onde joga?", "No Estádio de São Luís."), "facts": [["sao luis"]]},
            {"question": "Olá", "answer": "Olá!"},
        ),
    )
    write(
        raw / "b.csv", 'pergunta;resposta;facts\nCores?;Preto e branco.;"[""preto"", ""branco""]"\nE?;Sim.;\n'
    )
    result = run("--raw", raw, "--out", out, "--valid-fraction", "0.4")
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "valid.jsonl")
    by_question = {r["messages"][-2]["content"]: r.get("facts") for r in rows}
    assert by_question == {
        "Quando foi fundado o Farense?": [["1910"], ["1 de abril", "primeiro de abril"]],
        "Onde joga?": [["sao luis"]],
        "Olá": None,
        "Cores?": [["preto"], ["branco"]],
        "E?": None,
    }
    report = json.loads((out / "split_report.json").read_text())
    assert report["facts"]["train"] + report["facts"]["valid"] == 3


def test_csv_facts_cell_that_is_not_json(tmp_path):
    convs, rejected = load_one(tmp_path, "a.csv", "question,answer,facts\nQ?,A 1910.,[1910\nR?,B.,\n")
    assert convs == [qa("R?", "B.")]
    assert [(r["line"], r["reason"].split(" (")[0]) for r in rejected] == [(2, "facts: not JSON")]


def test_duplicate_conversations_merge_their_facts():
    convs = [qa("q", "a 1910 faro")] * 2
    facts = {}
    for named in ([["1910"]], [["faro"], ["1910"]]):
        key = pd.conversation_key(convs[0])
        facts[key] = pd.merge_facts(facts.get(key, []), named)
    unique, removed = pd.dedupe(convs)
    assert removed == 1 and pd.to_jsonl(unique, facts) == (
        b'{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a 1910 faro"}],'
        b'"facts":[["1910"],["faro"]]}\n'
    )


# --------------------------------------------------------------------------- evaluation sets


def eval_raw(tmp_path, train_records, paraphrases, oos=None):
    raw = tmp_path / "raw"
    write(raw / "train.jsonl", jl(*train_records))
    write(raw / "eval" / "paraphrases.jsonl", jl(*paraphrases))
    if oos is not None:
        write(raw / "eval" / "out_of_scope.jsonl", jl(*oos))
    write(raw / "eval" / "README.md", "# frozen\n")
    return raw


TRAIN = [
    {"question": q, "answer": f"Resposta {i}."}
    for i, q in enumerate(
        [
            "Qual é a cor da bola?",
            "Há treino amanhã?",
            "Quem é o roupeiro?",
            "Pergunta número 3 sobre o clube?",
            "Onde se estaciona?",
            "Vendem cachecóis?",
            "A que horas abre a porta?",
            "Há jogos à noite?",
            "O bar está aberto?",
            "Posso levar o cão?",
        ]
    )
]


def test_eval_sets_are_checked_and_written_beside_the_split(tmp_path):
    follow_up = {
        "messages": [
            {"role": "user", "content": "De onde é o clube?"},
            {"role": "assistant", "content": "De Faro."},
            {"role": "user", "content": " E o estádio? "},
        ],
        "facts": [["São Luís"]],
    }
    raw = eval_raw(
        tmp_path,
        TRAIN,
        [{"question": "Quando nasceu?", "facts": ["1910"]}, follow_up],
        [{"question": "Quem ganhou a Liga?", "facts": [["não sei", "não tenho essa informação"]]}],
    )
    out = tmp_path / "out"
    result = run("--raw", raw, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "README" not in result.stderr  # documentation beside the sets is not a data file
    assert "evaluation sets in" in result.stderr and "2 paraphrases" in result.stderr
    rows = read_jsonl(out / "train.jsonl") + read_jsonl(out / "valid.jsonl")
    assert len(rows) == 10  # the sets are not trained on
    para = read_jsonl(out / "eval" / "paraphrases.jsonl")
    assert para[0] == {"messages": [{"role": "user", "content": "Quando nasceu?"}], "facts": [["1910"]]}
    assert para[1]["messages"][-1] == {"role": "user", "content": "E o estádio?"}  # cleaned
    assert para[1]["messages"][0]["role"] == "user"  # no system prompt: evaluation adds the run's
    assert read_jsonl(out / "eval" / "out_of_scope.jsonl")[0]["facts"] == [
        ["não sei", "não tenho essa informação"]
    ]
    report = json.loads((out / "split_report.json").read_text())
    assert report["eval_sets"]["counts"] == {"out_of_scope": 1, "paraphrases": 2}
    assert report["eval_sets"]["near_copy_threshold"] == 0.5

    # the data without an eval folder: the stale sets are removed, not evaluated again
    (raw / "eval" / "paraphrases.jsonl").unlink()
    (raw / "eval" / "out_of_scope.jsonl").unlink()
    assert run("--raw", raw, "--out", out).returncode == 0
    assert (
        not (out / "eval" / "paraphrases.jsonl").exists()
        and not (out / "eval" / "out_of_scope.jsonl").exists()
    )


def test_a_training_question_near_an_evaluation_question_is_rejected(tmp_path):
    near = {"question": "Pergunta numero 3 sobre o clube", "facts": ["1910"]}  # accents, case, "?" aside
    raw = eval_raw(tmp_path, TRAIN, [{"question": "Como se chama o estádio?", "facts": ["x"]}, near])
    result = run("--raw", raw, "--out", tmp_path / "out")
    assert result.returncode == 1
    line = next(x for x in result.stderr.splitlines() if "near copy" in x)
    assert line.startswith(
        f"{raw}/train.jsonl:4: question 'Pergunta número 3 sobre o clube?' is a near copy of "
    )
    assert f"{raw}/eval/paraphrases.jsonl:2 " in line and "similarity 1.00 >= 0.5" in line
    result = run("--raw", raw, "--out", tmp_path / "out", "--skip-invalid")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "split_report.json").read_text())
    assert report["train"] + report["valid"] == 9 and len(report["rejected"]) == 1


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"question": "Q?"}, "missing 'facts' (an evaluation question must name the facts its answer holds)"),
        ({"question": "Q?", "facts": []}, "facts: empty"),
        ({"question": "", "facts": ["x"]}, "'question' is not a non-empty string"),
        (
            {"answer": "A", "facts": ["x"]},
            "expected 'question' (or 'messages' ending with a user turn) and 'facts'",
        ),
        ({"messages": qa("Q", "A"), "facts": ["x"]}, "'messages' does not end with a user turn"),
        ([1], "not a JSON object"),
    ],
)
def test_bad_evaluation_records(tmp_path, record, reason):
    raw = eval_raw(tmp_path, TRAIN, [{"question": "Bom?", "facts": ["x"]}, record])
    result = run("--raw", raw, "--out", tmp_path / "out")
    assert result.returncode == 1
    assert f"{raw}/eval/paraphrases.jsonl:2: {reason}" in result.stderr


def test_eval_folder_alone_is_no_training_data(tmp_path):
    raw = tmp_path / "raw"
    write(raw / "eval" / "paraphrases.jsonl", jl({"question": "Q?", "facts": ["x"]}))
    assert pd.list_files(raw) == ([], [])
    result = run("--raw", raw, "--out", tmp_path / "out")
    assert "using the sample data" in result.stderr
