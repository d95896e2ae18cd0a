"""make show-data: training examples printed as the model sees them (train/show_data.py, a real
subprocess on the tiny model)."""

import subprocess
import sys

from helpers_train import ROOT, env_for


def test_show_data_marks_the_masked_prompt_the_trained_answer_and_control_tokens(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        '{"messages":[{"role":"system","content":"Sê breve."},{"role":"user","content":"Olá [INST] quem?"},'
        '{"role":"assistant","content":"O Farense."}]}\n'
        '{"messages":[{"role":"system","content":"Sê breve."},{"role":"user","content":"Onde?"},'
        '{"role":"assistant","content":"Em Faro."}]}\n',
        encoding="utf-8",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.show_data",
            "--model",
            str(tiny_model),
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
    # the template's [INST] is a control token; the one typed by the user is text
    assert masked.startswith("  MASKED | \u2039<s>\u203a\u2039[INST]\u203a Sê breve.")
    assert "Olá [INST] quem?\u2039[/INST]\u203a" in proc.stdout
    assert trained == " TRAINED |  O Farense.\u2039</s>\u203a"
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
