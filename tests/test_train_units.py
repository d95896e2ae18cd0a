"""Unit tests of the training's pure parts: the learning-rate schedules, the config checks,
best/patience tracking, the resume fingerprint, the run layout, staged folders and the
metadata reader. (The black-box tests of the same code: test_train.py and friends.)"""

import argparse
import json

import numpy as np
import pytest

from core import atomic, config, schedules
from core.config import ConfigError, check_config, load_config
from core.paths import Layout, step_name
from train import bundle
from train.batches import examples_sha256
from train.state import RunState, describe_changes, fingerprint, fingerprint_id, step_seed


def lr_at(cfg, step):
    import mlx.core as mx

    fn = schedules.build(cfg)
    return fn if isinstance(fn, float) else fn(mx.array(step)).item()


def sched_cfg(name, **spec):
    return {"learning_rate": 1e-3, "iters": 100, "lr_schedule": {"name": name, "arguments": None, **spec}}


# --------------------------------------------------------------------------- schedules


def test_every_registered_schedule_is_accepted_by_the_config_check():
    cfg = load_config(None)
    for name in schedules.SCHEDULES:
        cfg["lr_schedule"]["name"] = name
        check_config(cfg)
    cfg["lr_schedule"]["name"] = "cosine_restarts"
    with pytest.raises(ConfigError, match=r"lr_schedule.name must be constant or cosine or linear"):
        check_config(cfg)


def test_constant_schedule():
    assert schedules.build(sched_cfg("constant")) == 1e-3
    assert schedules.build(dict(sched_cfg("constant"), lr_schedule=None)) == 1e-3


def test_cosine_warms_up_then_decays_to_min_lr():
    cfg = sched_cfg("cosine", warmup=10, min_lr=1e-4, warmup_init=0.0)
    assert lr_at(cfg, 0) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(cfg, 9) == pytest.approx(1e-3)  # the warmup's last step: the peak
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    assert lr_at(cfg, 55) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # half way down
    assert lr_at(cfg, 100) == pytest.approx(1e-4)
    assert lr_at(cfg, 500) == pytest.approx(1e-4)  # clipped past iters


def test_linear_decays_in_a_straight_line():
    cfg = sched_cfg("linear", warmup=0, min_lr=0.0)
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 25) == pytest.approx(7.5e-4, rel=1e-5)
    assert lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)


def test_an_mlx_lm_schedule_is_built_by_mlx_lm():
    cfg = {
        "learning_rate": 1e-3,
        "iters": 4,
        "lr_schedule": {
            "name": "cosine_decay",
            "warmup": 2,
            "warmup_init": 1e-7,
            "arguments": [1e-3, 4, 1e-5],
        },
    }
    assert lr_at(cfg, 0) == pytest.approx(1e-7)
    check_config(dict(load_config(None), **cfg))  # its name is not ours: accepted


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("fine_tune_type", "qlora", "fine_tune_type must be one of lora, dora, full, got 'qlora'"),
        ("optimizer", "lamb", "optimizer must be one of adam"),
        ("batch_size", 0, "batch_size must be a positive integer or auto"),
        ("batch_size", "zero", "batch_size must be a positive integer or auto"),
        ("iters", True, "iters must be a positive integer"),
        ("max_seq_length", 1, "max_seq_length must be an integer >= 2"),
        ("learning_rate", float("nan"), "learning_rate must be a positive number"),
        ("num_layers", 0, "num_layers must be -1 (all) or a positive integer"),
        ("system_prompt", 3, "system_prompt must be a string or null"),
        ("valid_fraction", 1.0, "valid_fraction must be a number between 0 and 1"),
        ("train_on", "first", "train_on must be one of last, all_assistant"),
        ("keep", "final", "keep must be one of best, last"),
        ("lora_parameters.dropout", 1.0, "lora_parameters.dropout must be in [0, 1)"),
        ("lora_parameters.keys", "self_attn.q_proj", "lora_parameters.keys must be null (every linear"),
        ("lora_parameters.keys", [], "lora_parameters.keys must be null (every linear"),
        ("auto_batch.memory_fraction", 0, "auto_batch.memory_fraction must be in (0, 1]"),
        ("replay.repeat", 0, "replay.repeat must be a positive integer"),
        ("replay.per_step", -1, "replay.per_step must be an integer >= 0"),
    ],
)
def test_a_bad_value_is_named(key, value, message):
    cfg = load_config(None, {key: value})
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert message in str(e.value)


def test_checks_that_depend_on_other_values_and_notes():
    cfg = load_config(None, {"fine_tune_type": "full", "lora_parameters.rank": 0})
    check_config(cfg)  # full: LoRA's parameters do not matter
    cfg = load_config(None, {"iters": 10, "lr_schedule.warmup": 10})
    assert any("never reaches its peak" in n for n in check_config(cfg))
    # repeat with per_step is refused only where there is replay text to repeat
    check_config(load_config(None, {"replay.repeat": 2, "replay.per_step": 1}))
    with pytest.raises(ConfigError, match="leave repeat at 1"):
        check_config(
            load_config(None, {"replay.data": "data/replay", "replay.repeat": 2, "replay.per_step": 1})
        )
    # a subset: what prepare_data needs
    cfg = load_config(None, {"seed": -1, "iters": 0})
    with pytest.raises(ConfigError, match="seed must be"):
        check_config(cfg, keys=("seed", "valid_fraction", "system_prompt"))


def test_defaults_of_the_new_keys():
    cfg = load_config(None)
    assert cfg["train_on"] == "last" and cfg["keep"] == "best"


def test_from_args_merges_options_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iters: 10\n")
    args = argparse.Namespace(
        config=str(path), set=["lr_schedule.warmup=3", "learning_rate=1e-4"], iters="7", lora_rank=None
    )
    cfg = config.from_args(args, {"iters": "iters", "lora_rank": "lora_parameters.rank"})
    assert cfg["iters"] == 7 and cfg["lr_schedule"]["warmup"] == 3 and cfg["learning_rate"] == 1e-4
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.from_args(argparse.Namespace(config=str(path), set=["oops"]), {})
    with pytest.raises(ConfigError, match="no such config file"):
        config.from_args(argparse.Namespace(config=str(tmp_path / "nope.yaml"), set=[]), {})


# --------------------------------------------------------------------------- best and patience


def test_best_and_patience():
    s = RunState()
    assert s.record_val(0, 3.0) is False and s.best is None and s.val_history == [[0, 3.0]]
    assert s.record_val(5, 2.0, min_delta=0.1, patience=2) and s.best == {"step": 5, "val_loss": 2.0}
    assert s.record_val(10, 1.95, min_delta=0.1, patience=2)  # a new best ...
    assert s.patience_counter == 1 and not s.done  # ... but not by min_delta
    assert not s.record_val(15, 2.5, min_delta=0.1, patience=2)
    assert s.done and s.stop_reason == "early_stopping"
    assert s.best == {"step": 10, "val_loss": 1.95} and s.final_val_loss == 2.5


def test_patience_zero_never_stops():
    s = RunState()
    for step in range(1, 50):
        s.record_val(step, float(step))
    assert not s.done and s.best["step"] == 1 and s.patience_counter == 48


def test_snapshot_and_restore_round_trip():
    s = RunState(batch_size=4)
    s.record_val(5, 1.5)
    s.add_report(2.0)
    s.add_report(None, 0.5)  # a replay step
    s.tokens_seen = 123
    saved = dict(s.snapshot(), data_position={"epoch": 1}, fingerprint={})  # extra checkpoint keys
    back = RunState.restore(json.loads(json.dumps(saved)), batch_size=8)
    assert back.best == s.best and back.val_history == s.val_history and back.tokens_seen == 123
    assert back.report == {"loss_sum": 2.0, "steps": 1, "replay_sum": 0.5, "replay_steps": 1}
    assert back.batch_size == 8
    assert back.take_report() == (2.0, 0.5) and back.take_report() == (None, None)
    assert RunState.restore({}) == RunState()  # an old checkpoint lacking keys


def test_a_report_window_saved_before_replay_existed_still_adds_up():
    s = RunState.restore({"report": {"loss_sum": 3.0, "steps": 2}})
    s.add_report(1.0, 0.25)
    assert s.take_report() == (pytest.approx(4.0 / 3), 0.25)


# --------------------------------------------------------------------------- resume fingerprint


def _fp(**changes):
    cfg = dict(load_config(None), model="models/tiny-mistral")
    cfg.update(changes)
    data = {"path": "d/train.jsonl", "count": 10, "sha256": "a" * 64}
    valid = {"path": "d/valid.jsonl", "count": 2, "sha256": "b" * 64}
    return cfg, data, valid


def test_the_same_setup_has_no_changes():
    cfg, t, v = _fp()
    a, b = fingerprint(cfg, t, v, "h" * 64), fingerprint(cfg, t, v, "h" * 64)
    assert describe_changes(a, b) == [] and fingerprint_id(a) == fingerprint_id(b)


def test_each_kind_of_change_is_described():
    cfg, t, v = _fp()
    old = fingerprint(cfg, t, v, "h" * 64)
    cfg2, _, _ = _fp(learning_rate=2e-5, iters=5)
    new = fingerprint(cfg2, dict(t, sha256="c" * 64, count=11), v, "g" * 64, world_size=2)
    changes = describe_changes(old, new)
    assert "learning_rate: 1e-05 -> 2e-05" in changes and "iters: 1000 -> 5" in changes
    assert any(c.startswith("train data changed: d/train.jsonl (10 -> 11") for c in changes)
    assert any(c.startswith("base model changed") for c in changes)
    assert any(c.startswith("processes (NPROC / HOSTFILE hosts): 1 -> 2") for c in changes)
    assert len(changes) == 5 and fingerprint_id(old) != fingerprint_id(new)


def test_other_tokens_from_the_same_files_and_settings_refuse_a_resume():
    """The encoded examples' hash catches what no file hash or setting names (the noised
    copies, the replay windows, the prompt rendering); a checkpoint from before it was
    recorded is compared without it, and a change named otherwise is not named twice."""
    cfg, t, v = _fp()
    examples = [([1, 5, 9, 2], 2), ([1, 7, 2], 1)]
    a = fingerprint(cfg, t, v, "h", encoded=examples_sha256(examples, []))
    b = fingerprint(cfg, t, v, "h", encoded=examples_sha256([([1, 5, 9, 2], 2), ([1, 7, 3], 1)], []))
    c = fingerprint(cfg, t, v, "h", encoded=examples_sha256([([1, 5, 9, 2], 3), ([1, 7, 2], 1)], []))
    assert examples_sha256(examples, []) == examples_sha256([(np.array(i), o) for i, o in examples], [])
    assert examples_sha256(examples, []) != examples_sha256(examples[:1], examples[1:])
    (change,) = describe_changes(a, b)
    assert change.startswith("the examples encode to other tokens though the files and settings")
    assert len(describe_changes(a, c)) == 1 and len({fingerprint_id(fp) for fp in (a, b, c)}) == 3
    older = fingerprint(cfg, t, v, "h")
    assert "encoded_sha256" not in older and describe_changes(older, a) == []
    moved = fingerprint(cfg, dict(t, sha256="c" * 64), v, "h", encoded=b["encoded_sha256"])
    assert [x.split(":")[0] for x in describe_changes(a, moved)] == ["train data changed"]


def test_keys_outside_the_trajectory_do_not_refuse_a_resume():
    cfg, t, v = _fp()
    cfg2, _, _ = _fp(save_every=7, patience=3, keep="last", steps_per_report=1)
    assert describe_changes(fingerprint(cfg, t, v, "h"), fingerprint(cfg2, t, v, "h")) == []


def test_replay_enters_the_fingerprint_only_when_a_run_has_it():
    cfg, t, v = _fp()
    plain = fingerprint(cfg, t, v, "h")
    assert "replay" not in plain["data"] and "replay_weight" not in plain["config"]
    text = {"path": "r", "count": 2, "sha256": "d" * 64}
    as_batches = {"data": "r", "weight": 1.0, "per_step": 0}  # as runs had it before per_step
    cfg1, _, _ = _fp(replay=as_batches)
    with_replay = fingerprint(cfg1, t, v, "h", replay_info=text)
    changes = describe_changes(plain, with_replay)
    assert changes[0] == "replay_weight: null -> 1.0" and changes[1].startswith(
        "replay data changed: r (None -> 2 texts"
    )
    cfg2, _, _ = _fp(replay={**as_batches, "weight": 2.0})
    heavier = fingerprint(cfg2, t, v, "h", replay_info=text)
    other = fingerprint(cfg1, t, v, "h", replay_info=dict(text, sha256="e" * 64))
    assert describe_changes(with_replay, heavier) == ["replay_weight: 1.0 -> 2.0"]
    assert len(describe_changes(with_replay, other)) == 1
    cfg3, _, _ = _fp(replay={**as_batches, "repeat": 2})
    often = fingerprint(cfg3, t, v, "h", replay_info=text)
    assert describe_changes(with_replay, often) == ["replay_repeat: null -> 2"]
    cfg4, _, _ = _fp(replay={"data": "r", "weight": 1.0})  # a checkpoint from before repeat and per_step
    assert fingerprint(cfg4, t, v, "h", replay_info=text) == with_replay
    every_step = fingerprint(cfg, t, v, "h", replay_info=text)  # the default: a window in every step
    assert describe_changes(with_replay, every_step) == ["replay_per_step: null -> 1"]
    ids = {fingerprint_id(fp) for fp in (plain, with_replay, heavier, other, often, every_step)}
    assert len(ids) == 6


def test_replay_windows_at_a_step_are_each_window_once_a_pass_and_a_function_of_the_step():
    from train.replay import windows_at

    taken = [i for step in range(1, 14) for i in windows_at(step, 2, 13, seed=0)]  # two passes
    assert sorted(taken[:13]) == sorted(taken[13:]) == list(range(13))
    assert taken[:13] != taken[13:]  # a new order each pass
    assert [windows_at(7, 2, 13, seed=0)] == [taken[12:14]]  # no state: the step says which
    assert windows_at(1, 1, 13, seed=0) == taken[:1] and windows_at(1, 2, 13, seed=1) != taken[:2]


def test_read_replay_names_what_is_wrong_and_hashes_what_it_read(tmp_path):
    from train.replay import read_replay

    with pytest.raises(ValueError, match=r"replay.data .*nowhere: no such file or folder"):
        read_replay(tmp_path / "nowhere")
    folder = tmp_path / "replay"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"replay.data .*replay: no \*.txt file in the folder"):
        read_replay(folder)
    (folder / "b.txt").write_text("Segundo.", encoding="utf-8")
    (folder / "a.txt").write_text("First.", encoding="utf-8")
    (folder / "notes.md").write_text("not read")
    text = read_replay(folder)
    assert text.texts == [("a.txt", "First."), ("b.txt", "Segundo.")] and text.info["count"] == 2
    assert read_replay(folder).sha256 == text.sha256
    (folder / "b.txt").write_text("Segundo!", encoding="utf-8")
    assert read_replay(folder).sha256 != text.sha256
    assert read_replay(folder / "a.txt").texts == [("a.txt", "First.")]
    (folder / "c.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"c.txt: not UTF-8 text \(byte 3\)"):
        read_replay(folder)


def test_the_loss_plot_draws_the_replay_kl_where_a_run_has_it():
    from train.bundle import loss_plot_png

    records = [
        {"step": 0, "train_loss": None, "val_loss": 2.8},
        {"step": 10, "train_loss": 2.4, "val_loss": None, "replay_kl": 0.08},
        {"step": 20, "train_loss": 1.5, "val_loss": 1.2, "replay_kl": 0.3},
    ]
    plain = [{k: v for k, v in r.items() if k != "replay_kl"} for r in records]
    with_kl, without = loss_plot_png(records, "run", 20), loss_plot_png(plain, "run", 20)
    assert with_kl[:8] == without[:8] == b"\x89PNG\r\n\x1a\n" and with_kl != without


def test_step_seeds():
    assert step_seed(0, 5) == step_seed(0, 5, rank=0) != step_seed(0, 6)
    assert step_seed(0, 5, rank=1) != step_seed(0, 5)


# --------------------------------------------------------------------------- layout, staged folders


def test_layout(tmp_path):
    lay = Layout.for_run("farense", tmp_path / "m", tmp_path / "l")
    assert lay.run == tmp_path / "m" / "farense"
    assert lay.step(200) == lay.checkpoints / "step_0000200" and step_name(12345678) == "step_12345678"
    assert lay.best.name == "best" and lay.last.name == "last"
    assert lay.metrics == tmp_path / "l" / "farense" / "metrics.jsonl"


def test_staged_dir_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "out"
    with atomic.staged_dir(final) as tmp:
        (tmp / "a.txt").write_text("one")
        assert not final.exists() and tmp.name.startswith(atomic.STAGED_PREFIX)
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(final) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("half way")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic.staged_dir(final) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------------- metadata


def _bundle(folder, **meta):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("adapters.safetensors", "adapter_config.json"):
        (folder / name).write_text("{}")
    (folder / "metadata.json").write_text(json.dumps({"format": 1, "base_model": "m", **meta}))
    (folder / "training_config.json").write_text(json.dumps({"iters": 3}))
    return folder


def test_read_metadata_names_the_problem(tmp_path):
    good = _bundle(tmp_path / "good")
    meta, cfg = bundle.read_run(good)
    assert meta["base_model"] == "m" and cfg["iters"] == 3
    for meta, message in [
        ({"format": 2}, "unsupported format 2"),
        ({"base_model": ""}, "base_model must be a non-empty string"),
        ({"generation": {"top_p": "1"}}, "generation.top_p must be a number"),
        ({"base_model_revision": 7}, "base_model_revision must be a string or null"),
        ({"adapter_file": "x.bin"}, "adapter_file must be 'adapters.safetensors'"),
    ]:
        folder = _bundle(tmp_path / message[:8].replace(" ", "_"), **meta)
        with pytest.raises(bundle.BundleError, match=message):
            bundle.read_metadata(folder)
    (good / "adapters.safetensors").unlink()
    with pytest.raises(bundle.BundleError, match="adapters.safetensors: missing"):
        bundle.read_metadata(good)
