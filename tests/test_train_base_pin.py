"""The base is pinned (issue 11, item 7): metadata.json records which base an adapter was
trained on (a folder's weights sha256, or a hub id's resolved revision), and the worker
refuses another one unless told to (WORKER_ALLOW_BASE_MISMATCH=1 / allow_base_mismatch)."""

import json
import shutil
import subprocess

import pytest
from helpers_train import PY, ROOT, TINY, env_for, ok, prepare_data, run_dir, run_train, write_config

from train import bundle


@pytest.fixture(scope="module")
def pinned(tmp_path_factory, tiny_model):
    """A 2-step adapter trained on a copy of the tiny model (absolute path)."""
    base = tmp_path_factory.mktemp("pin")
    model = base / "tiny-copy"
    shutil.copytree(TINY, model)
    config = write_config(base / "c.yaml", model=str(model), iters=2, steps_per_eval=2, save_every=2)
    ok(run_train(base, config, "run", prepare_data(base / "data")))
    return base, model, run_dir(base, "run")


def worker(adapter, base, *args, **env):
    return subprocess.run(
        [PY, "-m", "worker", "--adapter", str(adapter), *args],
        cwd=ROOT,
        input=b'{"id":"a","prompt":"Ol\\u00e1","max_tokens":2}\n',
        capture_output=True,
        env=env_for(base, **env),
        timeout=180,
    )


def change_one_weight(model):
    import mlx.core as mx

    f = next(model.glob("*.safetensors"))
    weights = dict(mx.load(str(f)))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})


def test_the_base_is_recorded_and_a_changed_one_is_refused(pinned):
    base, model, adapter = pinned
    meta = json.loads((adapter / "metadata.json").read_text())
    assert meta["base_model_hash_method"] == "sha256:safetensors+config"
    assert meta["base_model_hash"] == bundle.folder_hash(model)[0] and meta["base_model_revision"] is None
    proc = worker(adapter, base)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert any(json.loads(line).get("id") == "a" for line in proc.stdout.splitlines())

    change_one_weight(model)
    proc = worker(adapter, base)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", err[-2000:]
    assert "is not the one the adapter" in err and "--allow-base-mismatch" in err, err[-2000:]
    assert meta["base_model_hash"][:12] in err

    for override in ({"WORKER_ALLOW_BASE_MISMATCH": "1"}, {}):
        flag = () if override else ("--allow-base-mismatch",)
        proc = worker(adapter, base, *flag, **override)
        err = proc.stderr.decode()
        assert proc.returncode == 0 and "warning" in err and "(allowed)" in err, err[-2000:]


def fake_hub(cache, repo, revision):
    """A Hugging Face cache holding `repo` at `revision` (the tiny model's files)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / revision
    shutil.copytree(TINY, snap)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    return snap


def test_a_hub_id_records_its_revision_and_the_worker_pins_it(tmp_path, monkeypatch):
    from worker import loading

    rev_a, rev_b = "a" * 40, "b" * 40
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub(tmp_path / "hub", "org/tiny", rev_a)
    ident = bundle.base_model_identity("org/tiny")
    assert ident == {"name": "org/tiny", "hash": rev_a, "hash_method": "hf-revision", "revision": rev_a}

    adapter = tmp_path / "run"
    adapter.mkdir()
    for name in ("adapters.safetensors", "adapter_config.json"):
        (adapter / name).write_text("{}")
    meta = {
        "format": 1,
        "base_model": "org/tiny",
        "base_model_hash": rev_a,
        "base_model_hash_method": "hf-revision",
        "base_model_revision": rev_a,
    }
    (adapter / "metadata.json").write_text(json.dumps(meta))
    settings = loading.settings_for(adapter=str(adapter), allow_base_mismatch=False)
    assert settings.model_path == "org/tiny" and settings.revision == rev_a
    loading.check_base(settings)  # the pinned revision is cached

    # trained on revision b, which the cache lacks while main is a: mlx_lm.load fetches b
    # (check_base cannot look); with b in the cache but a different base given: refused
    meta.update(base_model_hash=rev_b, base_model_revision=rev_b)
    (adapter / "metadata.json").write_text(json.dumps(meta))
    loading.check_base(loading.settings_for(adapter=str(adapter), allow_base_mismatch=False))
    other = loading.settings_for(
        model=str(tmp_path / "hub" / "models--org--tiny" / "snapshots" / rev_a),
        adapter=str(adapter),
        allow_base_mismatch=False,
    )
    with pytest.raises(loading.LoadError, match=r"hub revision aaaaaaaaaaaa, trained on bbbbbbbbbbbb"):
        loading.check_base(other)
