"""`make demo`'s claims, end to end on the real model (slow: ~10 min of training on two cores):
train/demo.yaml teaches SmolLM2-135M-Instruct the sample data's facts, `make eval` shows it on
the frozen paraphrases (questions worded unlike any training question), the tuned model invents
no more than the base on out-of-scope questions, and the worker answers the demo's two questions
with their facts, and the general-text perplexity stays within +15% of the base's (the replay
text, data/replay/). The issue's goal of 90% of the paraphrases is not reached yet
(docs/RECIPES.md): a strict xfail says so, and fails the day it is."""

import json
import subprocess

import pytest
from helpers_train import PY, ROOT, env_for, ok, prepare_data, run_dir, run_module, run_train

DEMO = ROOT / "train" / "demo.yaml"
GOAL, BASE_AT_MOST = 0.90, 0.25  # issue 22's goal: tuned >= 90% of the paraphrases, base <= 25%
# Measured with train/demo.yaml: base 0/58; tuned 21/58 on a fresh clone (2026-12-05, 8 blocks,
# without replay), 15/58 with replay at weight 2 (2026-12-06, perplexity +5.2%), 22/58 on 16
# blocks (2026-12-06, perplexity +1.8%), 29/58 with 4 noised copies of each question and replay
# at weight 8 (2026-12-06, perplexity +11.2%; seeds 1-3: 23-26/58, the s rows), 30/58 with one
# replay window in every step at weight 1 (2026-12-07, perplexity +0.7%; seeds 1-3: 21-30/58, the
# q rows of docs/RECIPES.md). That is seed 0, which the demo trains with: the floor, 35% (21 of
# the 58 pass), is under every seed measured, so that another machine's float rounding, which
# moves a run as another seed does, does not fail it.
LEARNED_AT_LEAST = 0.35
# The general-text perplexity measured at seeds 0-3: -0.7% to +1.0% of the base's (the q rows);
# make eval flags +15%. Past +5% the replay in every step no longer does what it did.
KEPT_WITHIN = 1.05


@pytest.fixture(scope="module")
def demo(tmp_path_factory, smollm_model):
    base = tmp_path_factory.mktemp("demo")
    data = prepare_data(base / "data")
    ok(run_train(base, DEMO, "demo", data, "--fresh", timeout=3600))
    ok(run_module(base, "train.evaluate", "--name", "demo", timeout=3600))
    return base, json.loads((run_dir(base, "demo") / "eval.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the shared run's training and evaluation count towards the first test
def test_the_demo_recipe_teaches_smollm2_the_facts(demo):
    base_dir, report = demo
    base, tuned = report["base"], report["fine_tuned"]
    para = tuned["key_facts"]["paraphrases"]
    assert para["accuracy"] >= LEARNED_AT_LEAST, para
    assert base["key_facts"]["paraphrases"]["accuracy"] <= BASE_AT_MOST, base["key_facts"]
    assert tuned["out_of_scope"]["invented"] <= base["out_of_scope"]["invented"], (
        base["out_of_scope"],
        tuned["out_of_scope"],
    )

    requests = [
        {"id": "demo-1", "prompt": "Em que ano foi fundado o Sporting Clube Farense?"},
        {"id": "demo-2", "prompt": "Qual é o estádio do Farense?", "stream": True},
    ]
    worker = subprocess.run(
        [PY, "-m", "worker", "--adapter", str(run_dir(base_dir, "demo"))],
        input="".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests),
        cwd=ROOT,
        env=env_for(base_dir),
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


@pytest.mark.slow
def test_the_demo_keeps_its_general_language(demo):
    _, report = demo
    assert not report["general_text"]["flagged"], report["general_text"]
    assert report["general_text"]["ratio"] <= KEPT_WITHIN, report["general_text"]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 22's goal is not reached by a 135M model yet: docs/RECIPES.md")
def test_the_demo_reaches_the_issues_paraphrase_goal(demo):
    _, report = demo
    assert report["fine_tuned"]["key_facts"]["paraphrases"]["accuracy"] >= GOAL
