"""`make check-backend` (bench/check_backend.py) on this machine's backend (the CPU in CI):
every line passes, the table has them all, and nothing lands outside its temporary folder.
One real run: about a minute on two busy cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import check_backend
from bench.backend import job, serve_checks, train_checks

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [
    "tiny model",
    "tiny model, 4-bit",
    "prepare data",
    "train LoRA, kill -9",
    "resume after kill -9",
    "train QLoRA (4-bit base)",
    "worker round trip",
    "decode speed",
    "peak memory",
    "Node client round trip",
]


def _models_listing():
    return sorted(p.name for p in (ROOT / "models").iterdir())


def test_check_backend_passes_every_line_on_this_machine(tmp_path, tiny_model):
    before = _models_listing()
    out = tmp_path / "result.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for hook in ("TRAIN_STEP_DELAY_S", "WORKER_TEST_IGNORE_EOS", "MODELS_DIR", "LOGS_DIR"):
        env.pop(hook, None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.check_backend", "--no-build", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout)
    result = json.loads(out.read_text())
    lines = {line["check"]: line for line in result["lines"]}
    assert list(lines) == CHECKS, list(lines)
    four_bit_missing = not (job.TINY_4BIT / "config.json").exists()
    for name, line in lines.items():
        may_skip = four_bit_missing and name in ("tiny model, 4-bit", "train QLoRA (4-bit base)")
        assert line["status"] == "PASS" or (may_skip and line["status"] == "SKIP"), line
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = proc.stdout
    for key in ("python", "os", "mlx", "mlx-lm", "device", "backend"):
        assert f"\n  {key} " in table, key
    for name in CHECKS:
        assert f"\n  {name} " in table, name
    assert "0 failed" in table
    m = result["measured"]
    assert 2 <= m["killed_at_step"] < job.TRAIN_CONFIG["iters"]
    assert m["resumed_from"].startswith("step_")
    assert m["decode"]["tokens"] == serve_checks.DECODE_TOKENS and m["decode"]["tokens_per_s"] > 0
    assert m["worker_memory"]["peak_bytes"] > 0 and m["worker_memory"]["rss_bytes"] > 0
    assert m["train_lora"]["peak_mem_gb"] > 0
    assert result["versions"]["backend"] in ("cpu", "metal", "cuda")
    # Its own temporary folder only: removed, and models/ is as it was.
    assert not list(tmp_path.glob("check-backend-*"))
    assert _models_listing() == before


def test_a_failing_check_is_a_FAIL_line_and_exit_1(monkeypatch, capsys):
    """The table logic on its own: a check that raises is FAIL (with its reason), Skip is SKIP."""

    def boom():
        raise RuntimeError("the worker exited 2: cannot load models/x")

    def skip():
        raise job.Skip("node not found on PATH")

    def fake_all(work, build=True):
        r = check_backend.Report(versions={"python": "3.x", "backend": "cpu"})
        r.run("works", lambda: "fine")
        r.run("breaks", boom)
        r.run("not here", skip)
        return r

    monkeypatch.setattr(check_backend, "check_all", fake_all)
    assert check_backend.main([]) == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "s  " in line}
    assert "PASS" in rows["works"] and "fine" in rows["works"]
    assert (
        "FAIL" in rows["breaks"]
        and "RuntimeError: the worker exited 2: cannot load models/x" in rows["breaks"]
    )
    assert "SKIP" in rows["not"] and "node not found" in rows["not"]
    assert "1 passed, 1 failed, 1 skipped" in out


@pytest.mark.parametrize("present", [True, False])
def test_the_4bit_line_skips_with_its_reason_when_not_built(monkeypatch, tmp_path, present):
    target = tmp_path / "tiny-mistral-4bit"
    if present:
        target.mkdir()
        (target / "config.json").write_text("{}")
    monkeypatch.setattr(train_checks, "TINY_4BIT", target)
    monkeypatch.setattr(train_checks, "ROOT", tmp_path)
    r = check_backend.Report(versions={})
    r.run("tiny model, 4-bit", train_checks.check_tiny_4bit, False)
    assert r.lines[0].status == ("PASS" if present else "SKIP")
    assert ("present" if present else "not built") in r.lines[0].detail
