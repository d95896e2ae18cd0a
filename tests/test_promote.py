"""make promote (train/promote.py) with two tiny adapters on models/tiny-mistral: a good one
(lora_b = 0: the base model itself, trained on the sample data) and a bad one (random lora_b),
evaluated on the same validation file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import ROOT, TINY, ensure_tiny_model  # noqa: E402

import train  # noqa: E402,F401  (fast BLAS before mlx)
from train import promote  # noqa: E402

LORA = {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": None}


def make_run(models, name, noise, valid):
    """A run folder as training writes it (the files read_run checks), lora_b scaled by noise."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    out = models / name
    out.mkdir(parents=True)
    model, _ = load(str(TINY))
    mx.random.seed(1)
    linear_to_lora_layers(model, 4, LORA)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_b = mx.random.normal(module.lora_b.shape) * noise
    weights = {
        k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": LORA})
    )
    (out / "training_config.json").write_text(json.dumps({"batch_size": 4}))
    (out / "metadata.json").write_text(
        json.dumps(
            {
                "format": 1,
                "base_model": "models/tiny-mistral",
                "base_model_path": str(TINY),
                "system_prompt": None,
                "max_seq_length": 512,
                "fine_tune_type": "lora",
                "adapter_file": "adapters.safetensors",
                "data": {"valid": {"path": str(valid)}},
                "generation": {
                    "max_tokens": 16,
                    "max_tokens_cap": 64,
                    "temperature": 0.0,
                    "top_p": 1.0,
                    "top_k": 0,
                    "min_p": 0.0,
                    "repetition_penalty": 1.0,
                },
            }
        )
    )
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ensure_tiny_model()
    root = tmp_path_factory.mktemp("promote")
    valid = root / "valid.jsonl"
    lines = (ROOT / "data" / "sample" / "farense_qa.jsonl").read_text(encoding="utf-8").splitlines()
    valid.write_text("\n".join(lines[:12]) + "\n", encoding="utf-8")
    models = root / "models"
    make_run(models, "good", 0.0, valid)
    make_run(models, "bad", 0.5, valid)
    return models


def run(models, *args):
    return promote.main(["--models-dir", str(models), *args])


def current(models):
    link = models / "current"
    assert link.is_symlink()
    return os.readlink(link)


def test_promotes_a_better_candidate_and_refuses_a_worse_one(models, capsys):
    assert run(models, "--name", "good") == 0  # nothing live yet
    assert current(models) == "good"
    assert "no live adapter" in capsys.readouterr().out

    assert run(models, "--name", "bad") == promote.REFUSED
    out = capsys.readouterr().out
    assert "not promoted: bad is not better than good on loss" in out and "<- metric" in out
    assert current(models) == "good"

    assert run(models, "--name", "bad", "--force") == 0
    assert current(models) == "bad"
    assert "promoted: current -> bad (forced)" in capsys.readouterr().out

    assert run(models, "--name", "good") == 0
    assert current(models) == "good"
    out = capsys.readouterr().out
    assert "promoted: current -> good" in out and "forced" not in out
    assert run(models, "--name", "good") == 0
    assert "already current" in capsys.readouterr().out


def test_another_metric_and_errors(models, capsys):
    assert run(models, "--name", "bad", "--metric", "token_f1", "--limit", "4") in (0, promote.REFUSED)
    assert "metric: token_f1" in capsys.readouterr().out
    assert run(models, "--name", "missing") == 2


def test_switch_is_one_rename_and_leaves_no_temporary(models, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    promote.switch_current(tmp_path, "a")
    promote.switch_current(tmp_path, "b")
    assert os.readlink(tmp_path / "current") == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "current"]


def test_make_promote_target_runs_the_module():
    r = subprocess.run(
        ["make", "-n", "promote", "NAME=cand", "METRIC=chrf", "FORCE=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "-m train.promote --name cand --metric chrf --force" in r.stdout


# --------------------------------------------------------------------------- key facts


@pytest.fixture(scope="module")
def kf_models(tmp_path_factory):
    """good and bad runs whose validation data has facts and the sample's paraphrase set beside it
    (DIR/eval/paraphrases.jsonl, written by the code make data runs)."""
    from train import eval_sets

    ensure_tiny_model()
    root = tmp_path_factory.mktemp("promote_kf")
    valid = root / "valid.jsonl"
    lines = (ROOT / "data" / "sample" / "farense_qa.jsonl").read_text(encoding="utf-8").splitlines()
    valid.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    eval_sets.write(root, eval_sets.load(ROOT / "data" / "sample"))
    models = root / "models"
    make_run(models, "good", 0.0, valid)
    make_run(models, "bad", 0.5, valid)
    promote.switch_current(models, "good")
    return models


def printed(out, key):
    """(current, candidate) of one row of the printed comparison."""
    row = next(line for line in out.splitlines() if line.split()[:1] == [key])
    return float(row.split()[1]), float(row.split()[2])


@pytest.mark.parametrize("metric", ["key_facts", "key_facts_valid"])
def test_key_fact_metrics_decide_on_the_counts_they_print(kf_models, capsys, metric):
    code = run(kf_models, "--name", "bad", "--metric", metric, "--limit", "5")
    out = capsys.readouterr().out
    assert f"metric: {metric}" in out and "<- metric" in out
    assert ("+ 5 paraphrases" in out) == (metric == "key_facts")
    current, candidate = printed(out, metric)
    assert 0 <= candidate <= 5 and 0 <= current <= 5
    assert code == (0 if candidate > current else promote.REFUSED), out
    if code == 0:
        promote.switch_current(kf_models, "good")


def test_key_facts_is_strictly_better_or_refused():
    assert promote.is_better({"key_facts": 41}, {"key_facts": 40}, "key_facts")
    assert not promote.is_better({"key_facts": 40}, {"key_facts": 40}, "key_facts")
    assert not promote.is_better({"key_facts": 39}, {"key_facts": 40}, "key_facts")
    assert promote.is_better({"key_facts_valid": 3}, {"key_facts_valid": 2}, "key_facts_valid")


def test_key_facts_without_a_paraphrase_set_says_where(kf_models, tmp_path, capsys):
    (tmp_path / "valid.jsonl").write_bytes((kf_models.parent / "valid.jsonl").read_bytes())
    assert run(kf_models, "--name", "bad", "--metric", "key_facts", "--data", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/eval/paraphrases.jsonl: no paraphrase set for METRIC=key_facts" in err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "valid.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    assert run(kf_models, "--name", "bad", "--metric", "key_facts_valid", "--data", str(plain)) == 2
    assert "no conversation names facts" in capsys.readouterr().err


def test_make_promote_passes_a_key_fact_metric():
    r = subprocess.run(
        ["make", "-n", "promote", "NAME=cand", "METRIC=key_facts"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0 and "-m train.promote --name cand --metric key_facts" in r.stdout, r.stderr
