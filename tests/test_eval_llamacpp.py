"""make eval ENGINE=llamacpp (train/evaluate.py --engine llamacpp, train/eval_llamacpp.py): the
key-fact accuracy of a tuned SmolLM2 through the llama.cpp engine - make fuse's GGUF served by
the real worker - equals mlx's within one question (issue 26, Build item 3)."""

import json
from pathlib import Path

import pytest
from helpers_train import ok, run_module, shared_base, trained, write_config

from core import llamacpp
from train import eval_llamacpp, eval_model, eval_sets, facts

# A few steps of LoRA on SmolLM2-135M-Instruct: enough to move its answers towards the data's,
# little enough for make test (the model and the fuse's GGUF are what is exercised).
SMOL = {
    "model": "models/smollm2-135m-instruct",
    "num_layers": 8,
    "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
    "batch_size": 2,
    "iters": 4,
    "learning_rate": 2e-4,
    "lr_schedule": {"name": "cosine", "warmup": 1, "min_lr": 1e-5},
    "steps_per_eval": 4,
    "save_every": 4,
    "keep_last": 1,
}
LIMIT = 4  # questions of the split and of each evaluation set


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm_model):
    """(base, run folder): SmolLM2 tuned for 4 steps and fused (make fuse: its GGUF)."""
    if not llamacpp.installed():
        pytest.skip(llamacpp.INSTALL_HINT)
    shared = shared_base(tmp_path_factory)
    base = shared / "smol"
    config = write_config(shared / "smol.yaml", **SMOL)
    path, _ = trained(base, "smol", config, shared / "data")
    if not eval_llamacpp.fused_gguf(path).is_file():
        ok(run_module(base, "train.fuse", "--name", "smol", "--samples", 1))
    return base, path


def test_key_facts_through_the_llamacpp_engine_equal_mlxs_within_one_question(smol_run):
    base, run = smol_run
    args = ["--name", "smol", "--engine", "llamacpp", "--limit", LIMIT, "--max-tokens", 32]
    args += ["--general-text", base / "none"]  # no forgetting check: not what is compared
    proc = ok(run_module(base, "train.evaluate", *args))
    report = json.loads((run / "eval.json").read_text())
    section, tuned = report["llamacpp"], report["fine_tuned"]
    assert section["gguf"] == str(eval_llamacpp.fused_gguf(run))
    refused = eval_model.refusals(eval_sets.read_prepared(Path(report["data"]["path"]).parent))
    asked = [(e["facts"], e["fine_tuned"], "valid") for e in report["examples"]]
    for name in ("paraphrases", "out_of_scope"):
        asked += [(e["facts"], e["fine_tuned"], name) for e in report["eval_sets"][name]["examples"]]
    theirs = section["llamacpp_answers"]
    assert section["answers"] == len(theirs) == len(asked) == 3 * LIMIT
    # greedy on the same weights (float32 in mlx, F16 in the GGUF): the same text, nearly always;
    # answers sent back to the wrong question would share none
    same = sum(mine == answer for (_, mine, _), answer in zip(asked, theirs))
    assert same == section["identical_answers"] >= len(asked) // 2, section
    # every measure re-judged from the answers shown: mlx's as eval.json has it, llama.cpp's as
    # the section counts it, the two within one question
    for name, row in section["measures"].items():
        items = [
            (named, mine, answer) for (named, mine, s), answer in zip(asked, theirs) if s == name and named
        ]
        ok_mlx = sum(facts.judge(mine, named, refused)["ok"] for named, mine, _ in items)
        ok_llama = sum(facts.judge(answer, named, refused)["ok"] for named, _, answer in items)
        assert (row["of"], row["mlx"], row["llamacpp"]) == (len(items), ok_mlx, ok_llama), name
        assert abs(ok_mlx - ok_llama) <= 1, (name, section["judged_apart"])
    assert set(section["measures"]) == {"valid", "paraphrases", "out_of_scope"}
    assert section["within_one_question"]
    assert tuned["key_facts"]["valid"]["correct"] == section["measures"]["valid"]["mlx"]
    assert "llama.cpp engine" in proc.stdout and "within one question" in proc.stdout
    assert "## The llama.cpp engine" in (run / "eval.md").read_text()


def test_without_the_gguf_it_says_so_before_evaluating(smol_run, tmp_path):
    base, run = smol_run
    before = (run / "eval.json").stat().st_mtime_ns if (run / "eval.json").exists() else None
    missing = tmp_path / "none.gguf"
    proc = run_module(base, "train.evaluate", "--name", "smol", "--engine", "llamacpp", "--gguf", missing)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{missing} is missing" in proc.stderr and "make fuse NAME=smol" in proc.stderr
    assert "loading" not in proc.stderr  # refused before mlx's evaluation
    after = (run / "eval.json").stat().st_mtime_ns if (run / "eval.json").exists() else None
    assert before == after


def _result(split_ok, para_ok, declined):
    """One engine's judged answers as train/evaluate.py's judged() gives them (pure data)."""

    def judgements(oks):
        return [{"ok": o} for o in oks]

    def summary(oks, key="correct"):
        return {key: sum(oks), "of": len(oks)}

    return {
        "answers": [f"a{i}" for i in range(len(split_ok))],
        "judgements": judgements(split_ok),
        "key_facts": summary(split_ok),
        "sets": {
            "paraphrases": {
                "answers": ["p"] * 3,
                "judgements": judgements(para_ok),
                "summary": summary(para_ok),
            },
            "out_of_scope": {
                "answers": ["o"] * 3,
                "judgements": judgements(declined),
                "summary": summary(declined, "declined"),
            },
        },
    }


@pytest.mark.parametrize(
    "other, within",
    [
        (([1, 0, 1], [1, 1, 0], [1, 1, 1]), True),  # the same
        (([1, 0, 0], [1, 1, 1], [1, 1, 0]), True),  # each measure one apart
        (([0, 0, 0], [1, 1, 0], [1, 1, 1]), False),  # the split's key facts two apart
        (([1, 0, 1], [1, 1, 0], [0, 0, 1]), False),  # the declines two apart
    ],
)
def test_the_rule_is_within_one_question_per_measure(other, within):
    mlx = _result([1, 0, 1], [1, 1, 0], [1, 1, 1])
    section = eval_llamacpp.compare("valid", mlx, _result(*other), "x.gguf")
    assert section["within_one_question"] is within
    apart = sum(a != b for a, b in zip([1, 0, 1, 1, 1, 0, 1, 1, 1], sum(other, [])))
    assert len(section["judged_apart"]) == apart
