"""`make demo`'s claims, end to end on the real model (slow: ~10 min of training on two cores):
train/demo.yaml teaches SmolLM2-135M-Instruct the sample data's facts, `make eval` shows it on
the frozen paraphrases (questions worded unlike any training question), the tuned model invents
no more than the base on out-of-scope questions and keeps its general-text perplexity within
+15%, and the worker answers the demo's two questions with their facts."""

import json
import subprocess

import pytest
from helpers_train import PY, ROOT, env_for, ok, prepare_data, run_dir, run_module, run_train

DEMO = ROOT / "train" / "demo.yaml"
GOAL, BASE_AT_MOST = 0.90, 0.25  # issue 22's goal: tuned >= 90% of the paraphrases, base <= 25%


@pytest.mark.slow
def test_the_demo_recipe_teaches_smollm2_the_facts(tmp_path, smollm_model):
    data = prepare_data(tmp_path / "data")
    ok(run_train(tmp_path, DEMO, "demo", data, "--fresh", timeout=3600))
    ok(run_module(tmp_path, "train.evaluate", "--name", "demo", timeout=3600))
    report = json.loads((run_dir(tmp_path, "demo") / "eval.json").read_text())
    base, tuned = report["base"], report["fine_tuned"]
    para = tuned["key_facts"]["paraphrases"]
    assert para["accuracy"] >= GOAL, para
    assert base["key_facts"]["paraphrases"]["accuracy"] <= BASE_AT_MOST, base["key_facts"]
    assert para["degenerate"] == 0, para
    assert tuned["out_of_scope"]["invented"] <= base["out_of_scope"]["invented"], (
        base["out_of_scope"],
        tuned["out_of_scope"],
    )
    assert not report["general_text"]["flagged"], report["general_text"]

    requests = [
        {"id": "demo-1", "prompt": "Em que ano foi fundado o Sporting Clube Farense?"},
        {"id": "demo-2", "prompt": "Qual é o estádio do Farense?", "stream": True},
    ]
    worker = subprocess.run(
        [PY, "-m", "worker", "--adapter", str(run_dir(tmp_path, "demo"))],
        input="".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests),
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    check = subprocess.run(
        [PY, "-m", "train.demo_check", "--expect", "demo-1=1910", "--expect", "demo-2=São Luís"],
        input=worker.stdout,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout[-2000:] + worker.stderr[-2000:]
