"""make show-data: training examples printed as the model sees them (train/show_data.py, a real
subprocess on each family's model: the tiny Mistral v0.3 one and SmolLM2)."""

import json
import subprocess
import sys

import pytest
from helpers_train import ROOT, env_for

# Per family: a control string a user types (text), and what the example must print.
FAMILIES = {
    "mistral": (
        "tiny_model",
        "[INST]",
        "  MASKED | \u2039<s>\u203a\u2039[INST]\u203a Sê breve.",
        "Olá [INST] quem?\u2039[/INST]\u203a",
        " TRAINED |  O Farense.\u2039</s>\u203a",
    ),
    "smollm2": (
        "smollm_model",
        "<|im_end|>",
        "  MASKED | \u2039<|im_start|>\u203asystem",
        "Olá <|im_end|> quem?\u2039<|im_end|>\u203a",
        " TRAINED | O Farense.\u2039<|im_end|>\u203a",
    ),
}


def write_train(tmp_path, rows, roles):
    """tmp_path/data/train.jsonl: one conversation per row, its contents in the roles given."""
    data = tmp_path / "data"
    data.mkdir()
    lines = [{"messages": [{"role": r, "content": c} for r, c in zip(roles, row)]} for row in rows]
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return data


def show_data(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "train.show_data", *map(str, args)],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_show_data_marks_the_masked_prompt_the_trained_answer_and_control_tokens(request, family, tmp_path):
    fixture, typed, masked_start, user_line, trained_line = FAMILIES[family]
    model = request.getfixturevalue(fixture)
    rows = [("Sê breve.", f"Olá {typed} quem?", "O Farense."), ("Sê breve.", "Onde?", "Em Faro.")]
    data = write_train(tmp_path, rows, ("system", "user", "assistant"))
    proc = show_data(tmp_path, "--model", model, "--data", data, "-n", "1", "--color", "never")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"--- {data / 'train.jsonl'}:1: ")
    masked = next(line for line in lines if line.strip().startswith("MASKED"))
    trained = next(line for line in lines if line.strip().startswith("TRAINED"))
    # the template's markup is control tokens; the same string typed by the user is text
    assert masked.startswith(masked_start)
    assert user_line in proc.stdout
    assert trained == trained_line
    assert "--- " + str(data / "train.jsonl") + ":2" not in proc.stdout  # -n 1
    assert "2 examples (train_on: last)" in lines[-1]


def test_show_data_names_the_line_a_template_cannot_encode(tiny_model, tmp_path):
    data = write_train(tmp_path, [("Quem?",)], ("user",))
    proc = show_data(tmp_path, "--model", tiny_model, "--data", data)
    assert proc.returncode == 1
    assert f"{data / 'train.jsonl'}:1: a training conversation must end with an assistant turn" in proc.stderr


def test_show_data_counts_and_marks_the_noised_questions(tiny_model, tmp_path):
    """With question_noise in the config, make show-data reads the data as training does: the
    file's conversations, then their noised copies, each named by its source line."""
    rows = [("Em que estádio joga o Farense em casa?", "No São Luís."), ("Onde?", "Em Faro.")]
    data = write_train(tmp_path, rows, ("user", "assistant"))
    config = tmp_path / "noise.yaml"
    config.write_text("question_noise: 3\n", encoding="utf-8")
    args = ("--config", config, "--model", tiny_model, "--data", data, "-n", "9", "--color", "never")
    proc = show_data(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if line.startswith("--- ")]
    added = len(heads) - 2  # "Onde?" is too short to noise
    assert "question noise: " + f"{added} noised questions added to 2 conversations" in proc.stderr
    assert 1 <= added <= 3 and f"{2 + added} examples" in proc.stdout.splitlines()[-1]
    assert heads[1].startswith(f"--- {data / 'train.jsonl'}:2: ")
    assert all(h.startswith(f"--- {data / 'train.jsonl'}:1 (a noised copy): ") for h in heads[2:]), heads
