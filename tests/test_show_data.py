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


@pytest.mark.parametrize("family", list(FAMILIES))
def test_show_data_marks_the_masked_prompt_the_trained_answer_and_control_tokens(request, family, tmp_path):
    fixture, typed, masked_start, user_line, trained_line = FAMILIES[family]
    model = request.getfixturevalue(fixture)
    data = tmp_path / "data"
    data.mkdir()
    rows = [("Sê breve.", f"Olá {typed} quem?", "O Farense."), ("Sê breve.", "Onde?", "Em Faro.")]
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": r, "content": c} for r, c in zip(("system", "user", "assistant"), row)
                    ]
                }
            )
            + "\n"
            for row in rows
        ),
        encoding="utf-8",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.show_data",
            "--model",
            str(model),
            "--data",
            str(data),
            "-n",
            "1",
            "--color",
            "never",
        ],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages":[{"role":"user","content":"Quem?"}]}\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "train.show_data", "--model", str(tiny_model), "--data", str(data)],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"{data / 'train.jsonl'}:1: a training conversation must end with an assistant turn" in proc.stderr


def test_show_data_counts_and_marks_the_noised_questions(tiny_model, tmp_path):
    """With question_noise in the config, make show-data reads the data as training does: the
    file's conversations, then their noised copies, each named by its source line."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [("Em que estádio joga o Farense em casa?", "No São Luís."), ("Onde?", "Em Faro.")]
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in rows
        ),
        encoding="utf-8",
    )
    config = tmp_path / "noise.yaml"
    config.write_text("question_noise: 3\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "train.show_data", "--config", str(config), "--model", str(tiny_model)]
    proc = subprocess.run(
        [*cmd, "--data", str(data), "-n", "9", "--color", "never"],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    heads = [line for line in proc.stdout.splitlines() if line.startswith("--- ")]
    added = len(heads) - 2  # "Onde?" is too short to noise
    assert "question noise: " + f"{added} noised questions added to 2 conversations" in proc.stderr
    assert 1 <= added <= 3 and f"{2 + added} examples" in proc.stdout.splitlines()[-1]
    assert heads[1].startswith(f"--- {data / 'train.jsonl'}:2: ")
    assert all(h.startswith(f"--- {data / 'train.jsonl'}:1 (a noised copy): ") for h in heads[2:]), heads
