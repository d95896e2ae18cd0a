"""core/calibrate.py and what core/blas.py makes of its choice: each child process really loads
what its settings say (read back from the libraries), the stored choice is applied per role and
only on the CPU it was measured on, settings made by hand win, and the decision keeps the
default unless an alternative wins by the margin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import blas, calibrate

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="core/blas.py acts on Linux only"
)

# Loads the BLAS as a fresh process would, runs one product through mlx (Intel OpenMP starts its
# threads there), then prints what the libraries report.
PROBE = (
    "import json, os, sys\n"
    "pkg = os.environ.get('PROBE_IMPORT', 'core')\n"
    "__import__(pkg)\n"
    "from core import blas\n"
    "import mlx.core as mx\n"
    "mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64)))\n"
    "print(json.dumps({'loaded': blas.loaded_state(), 'role': blas.role, 'policy': blas.policy,\n"
    "                  'env': {k: os.environ.get(k) for k in ('KMP_BLOCKTIME', 'OPENBLAS_THREAD_TIMEOUT',\n"
    "                          'MKL_DYNAMIC', 'FAST_BLAS_ROLE', 'FAST_BLAS_AUTO')}}))\n"
)


def probe(env):
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def base_env(tmp_path, **extra):
    """This test process's environment less the settings calibration controls, with the
    calibration file in tmp_path (never the shared .venv's)."""
    env = calibrate.child_env({}, os.environ)
    env.pop("FAST_BLAS_CALIBRATION")
    return {**env, "FAST_BLAS_CALIBRATION_FILE": str(tmp_path / "calibration.json"), **extra}


@linux_only
def test_each_candidate_child_loads_what_its_settings_say(tmp_path):
    cands = calibrate.candidates()
    if not cands:
        pytest.skip("no optimised BLAS library on this machine")
    kernel = os.path.exists(blas.SMALL_GEMM_PATH)
    for name, settings in cands:
        for small in ("0", "1") if kernel else ("0",):
            told = {**settings, "SMALL_GEMM": small}
            got = probe({**base_env(tmp_path), **told})["loaded"]
            assert calibrate.mismatches(told, got) == [], (name, told, got)
            assert os.path.realpath(got["blas"]) == os.path.realpath(settings["FAST_BLAS_LIB"])
            want = blas.POLICIES[settings["FAST_BLAS_POLICY"]]
            if "mkl" in got["blas"]:
                assert got["kmp_blocktime"] == int(want["KMP_BLOCKTIME"]) and got["mkl_dynamic"] == 1
            else:
                assert got["openblas_thread_timeout"] == want["OPENBLAS_THREAD_TIMEOUT"]
            assert got["small_gemm"] is (small == "1")


def test_mismatches_names_what_differs():
    told = {"FAST_BLAS_LIB": "/x/libmkl_rt.so.3", "FAST_BLAS_POLICY": "spin", "SMALL_GEMM": "0"}
    right = {"blas": "/x/libmkl_rt.so.3", "kmp_blocktime": 200, "small_gemm": False}
    assert calibrate.mismatches(told, right) == []
    wrong = calibrate.mismatches(
        told, {"blas": "/y/libopenblas.so.0", "kmp_blocktime": 0, "small_gemm": True}
    )
    assert len(wrong) == 3 and "libopenblas" in wrong[0] and "block time 0 instead of 200" in wrong[1]
    assert "small_gemm on with SMALL_GEMM=0" in wrong[2]
    # a variable set by hand is what the child must show, not the policy's value
    assert (
        calibrate.mismatches({"FAST_BLAS_POLICY": "spin", "KMP_BLOCKTIME": "7"}, {"kmp_blocktime": 7}) == []
    )


def _record(decode, train, cpu=None):
    lib = calibrate.libraries()
    path = lib.get("mkl") or lib.get("openblas")
    return {
        "cpu": cpu or blas.cpu_identity(),
        "when": "2030-01-01 00:00:00",
        "load": [0.0, 0.0],
        "rounds": 1,
        "choice": {
            "decode": {"FAST_BLAS_LIB": path, "FAST_BLAS_POLICY": decode},
            "train": {"FAST_BLAS_LIB": path, "FAST_BLAS_POLICY": train},
        },
        "decision": {},
        "results": {},
    }


@linux_only
@pytest.mark.parametrize("pkg, role", [("worker", "decode"), ("train", "train"), ("core", "decode")])
def test_the_stored_choice_is_applied_per_role_and_not_inherited(tmp_path, pkg, role):
    if not calibrate.libraries():
        pytest.skip("no optimised BLAS library on this machine")
    (tmp_path / "calibration.json").write_text(json.dumps(_record(decode="spin", train="sleep")))
    got = probe(base_env(tmp_path, PROBE_IMPORT=pkg))
    want = {"decode": "spin", "train": "sleep"}[role]
    assert got["role"] == role and got["policy"] == want
    assert got["env"]["FAST_BLAS_ROLE"] is None  # consumed: a child process chooses for itself
    assert got["env"]["KMP_BLOCKTIME"] == blas.POLICIES[want]["KMP_BLOCKTIME"]
    auto = {f"{k}={v}" for k, v in blas.POLICIES[want].items()} | {"MKL_DYNAMIC=TRUE"}
    assert set(got["env"]["FAST_BLAS_AUTO"].split(",")) == auto
    assert calibrate.mismatches({"FAST_BLAS_POLICY": want}, got["loaded"]) == []


@linux_only
def test_settings_by_hand_win_and_inherited_automatic_ones_do_not(tmp_path):
    if not calibrate.libraries():
        pytest.skip("no optimised BLAS library on this machine")
    (tmp_path / "calibration.json").write_text(json.dumps(_record(decode="spin", train="spin")))
    by_hand = probe(base_env(tmp_path, KMP_BLOCKTIME="7", OPENBLAS_THREAD_TIMEOUT="5"))
    assert by_hand["env"]["KMP_BLOCKTIME"] == "7" and by_hand["env"]["FAST_BLAS_AUTO"] == "MKL_DYNAMIC=TRUE"
    assert calibrate.mismatches({"KMP_BLOCKTIME": "7"}, by_hand["loaded"]) == []
    forced = probe(base_env(tmp_path, FAST_BLAS_POLICY="sleep"))
    assert forced["policy"] == "sleep" and forced["env"]["KMP_BLOCKTIME"] == "0"
    # a parent's core.blas set KMP_BLOCKTIME=0 for its own role: the child recomputes it
    inherited = probe(base_env(tmp_path, KMP_BLOCKTIME="0", FAST_BLAS_AUTO="KMP_BLOCKTIME=0"))
    assert inherited["policy"] == "spin" and inherited["env"]["KMP_BLOCKTIME"] == "200"
    # ... unless it was changed since: then it is a setting by hand
    changed = probe(base_env(tmp_path, KMP_BLOCKTIME="50", FAST_BLAS_AUTO="KMP_BLOCKTIME=0"))
    assert changed["env"]["KMP_BLOCKTIME"] == "50" and changed["loaded"]["kmp_blocktime"] in (None, 50)


@linux_only
def test_a_calibration_from_another_cpu_or_unreadable_is_ignored(tmp_path):
    other = dict(blas.cpu_identity(), name="Some Other CPU")
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(_record(decode="spin", train="spin", cpu=other)))
    assert blas.read_calibration(str(path)) is None
    got = probe(base_env(tmp_path))
    assert got["policy"] == blas.DEFAULT_POLICY
    path.write_text("{not json")
    assert blas.read_calibration(str(path)) is None
    done = subprocess.run(
        [sys.executable, "-c", "import core"],
        env=base_env(tmp_path, FAST_BLAS_QUIET="0"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and f"ignoring {path}" in done.stderr
    path.write_text(json.dumps(_record(decode="spin", train="spin")))
    assert blas.read_calibration(str(path))["choice"]["decode"]["FAST_BLAS_POLICY"] == "spin"


def _results(rates):
    """{name: {"rates": {item: [...]}}} from {name: {item: [...]}}."""
    return {name: {"settings": {}, "rates": r} for name, r in rates.items()}


def test_decide_keeps_the_default_unless_beaten_by_the_margin():
    roles = {"decode": ["d1", "d8"], "train": ["t"]}
    res = _results(
        {
            "default": {"d1": [10, 10, 10], "d8": [40, 40, 40], "t": [100, 100, 100]},
            "fast": {
                "d1": [12, 13, 12],
                "d8": [44, 44, 44],
                "t": [104, 103, 104],
            },  # decode 1.15x, train 1.04x
            "noisy": {"d1": [30, 5, 5], "d8": [120, 20, 20], "t": [50, 50, 200]},  # one lucky round
        }
    )
    d = calibrate.decide(res, roles=roles, margin=0.05)
    assert d["decode"]["choice"] == "fast" and d["decode"]["scores"]["fast"] == pytest.approx(
        (1.2 * 1.1) ** 0.5
    )
    assert d["train"]["choice"] == "default"  # 1.04x is within the margin
    assert d["decode"]["scores"]["noisy"] == pytest.approx(
        0.5
    )  # medians of paired ratios, not the best round
    assert calibrate.decide(res, roles=roles, margin=0.2)["decode"]["choice"] == "default"


def test_decide_scores_each_kernel_mode_against_the_default_mode():
    roles = {"decode": ["d1", "d8"], "train": ["t"]}
    rates = {  # the kernel loses at M=1 and wins at M=8, with "spin" better everywhere
        "mkl sleep": {"d1|all": [10, 10], "d1|off": [20, 20], "d1|from4": [20, 20], "d8|all": [40] * 2},
        "mkl spin": {"d1|all": [11, 11], "d1|off": [22, 22], "d1|from4": [22, 22], "d8|all": [44] * 2},
    }
    for r in rates.values():
        r |= {"d8|off": [20, 20], "d8|from4": r["d8|all"], "t": [5, 5]}
    res = _results(rates)
    res["mkl spin"]["settings"] = {"FAST_BLAS_POLICY": "spin"}
    d = calibrate.decide(res, roles=roles)
    assert list(d["decode"]["scores"])[0] == "mkl sleep, kernel all"  # the default option first
    assert d["decode"]["choice"] == "mkl spin, kernel from4"
    assert d["decode"]["scores"]["mkl spin, kernel from4"] == pytest.approx((2.2 * 1.1) ** 0.5)
    assert d["decode"]["settings"] == {"FAST_BLAS_POLICY": "spin", "SMALL_GEMM": "1", "SMALL_GEMM_MIN_M": "4"}
    assert d["train"]["choice"] == "mkl sleep" and d["train"]["settings"] == {}  # no kernel mode for training


def test_parse_candidate_and_table():
    assert calibrate.parse_candidate("a:X=1,Y=b=c") == ("a", {"X": "1", "Y": "b=c"})
    for bad in (":X=1", "a:X", "a:=1"):
        with pytest.raises(ValueError, match="candidate"):
            calibrate.parse_candidate(bad)
    roles = {"decode": ["d1"], "train": ["t"]}
    res = _results(
        {"mkl sleep": {"d1": [10, 12, 11], "t": [5, 5, 5]}, "mkl spin": {"d1": [20, 20, 20], "t": [5, 5, 5]}}
    )
    lines = calibrate.table({"results": res, "decision": calibrate.decide(res, roles=roles)})
    assert lines[1].split() == ["d1", "11.0", "20.0"]
    assert lines[4].startswith("decode score  mkl spin") and lines[4].endswith("<- chosen")
    assert lines[5].startswith("train score  mkl sleep") and lines[5].endswith("<- chosen")


def test_calibration_shapes_match_the_models_we_build():
    from bench.bench_model import BENCH_CONFIG
    from core.calibrate_work import SHAPES
    from train.tiny_model import TINY_CONFIG

    dims = (
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    for shape, config in (("tiny", TINY_CONFIG), ("bench", BENCH_CONFIG)):
        assert {k: SHAPES[shape][k] for k in dims} == {k: config[k] for k in dims}, shape


@linux_only
def test_calibrate_end_to_end_stores_a_choice_that_a_process_then_loads(tmp_path):
    if not calibrate.libraries():
        pytest.skip("no optimised BLAS library on this machine")
    env = base_env(tmp_path)
    cmd = [sys.executable, "-m", "core.calibrate", "--rounds", "1", "--tokens", "4"]
    cmd += ["--decode", "decode:tiny:1", "--train", "train:tiny", "--store"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "calibration.json").read_text())
    assert record["cpu"] == blas.cpu_identity() and set(record["choice"]) == {"decode", "train"}
    assert [n for n, _ in calibrate.candidates()] == list(record["results"])
    assert "decode score" in done.stdout and f"stored in {tmp_path / 'calibration.json'}" in done.stdout
    again = subprocess.run(
        cmd[:3] + ["--if-needed"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "already done on this CPU" in again.stdout
    got = probe(env)
    assert got["policy"] == record["choice"]["decode"]["FAST_BLAS_POLICY"]
    assert calibrate.mismatches(record["choice"]["decode"], got["loaded"]) == []
    shown = subprocess.run(
        cmd[:3] + ["--show"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "decode score" in shown.stdout and record["when"] in shown.stdout


def _ctx(plan):
    from bench.common import Context

    return Context(plan=plan, tmp=Path("."), res={}, workers=None)


def test_bench_settings_warns_when_the_current_settings_are_beaten(monkeypatch):
    """The section's logic on given rates: the current settings (here the defaults, as in the
    tests) are the base; an option more than 5% faster is a warning and the rows show both."""
    from bench import settings

    cands = [("mkl sleep", {"FAST_BLAS_LIB": "/x/libmkl_rt.so.3", "FAST_BLAS_POLICY": "sleep"})]
    cands.append(("mkl spin", {"FAST_BLAS_LIB": "/x/libmkl_rt.so.3", "FAST_BLAS_POLICY": "spin"}))
    rates = {
        "mkl sleep": {"decode:bench:1|all": [10.0, 10.0], "decode:bench:1|off": [10.0, 11.0]},
        "mkl spin": {"decode:bench:1|all": [10.0, 10.0], "decode:bench:1|off": [14.0, 14.0]},
    }
    results = {n: {"settings": s, "loaded": {}, "rates": rates[n]} for n, s in cands}
    monkeypatch.setattr(calibrate, "candidates", lambda: cands)
    monkeypatch.setattr(calibrate, "kernel_modes", lambda: ["all", "off"])
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: results)
    monkeypatch.setattr(calibrate, "current_settings", lambda role: dict(cands[0][1]))
    ctx = _ctx(dict(settings.PLAN["quick"], settings_decode=["decode:bench:1"]))
    settings.section(ctx)
    assert ctx.res["settings"]["base"] == {"decode": "mkl sleep, kernel all"}
    (warning,) = ctx.res["warnings"]
    assert "mkl spin, kernel off beats the current settings (mkl sleep, kernel all) by 1.40x" in warning
    (row,) = settings.rows(ctx.res)
    assert (row["ours"], row["anchor"], row["paired_ratio"]) == (10.0, 14.0, pytest.approx(10 / 14))
    assert row["ours_label"] == "mkl sleep, kernel all" and row["met"] is False
    rates["mkl spin"]["decode:bench:1|off"] = [10.2, 10.2]  # within 5%: no warning, target met
    ctx = _ctx(dict(settings.PLAN["quick"], settings_decode=["decode:bench:1"]))
    settings.section(ctx)
    assert "warnings" not in ctx.res and settings.rows(ctx.res)[0]["met"] is True


@linux_only
def test_bench_settings_runs_each_candidate_for_real(monkeypatch):
    from bench import settings

    if not calibrate.libraries():
        pytest.skip("no optimised BLAS library on this machine")
    plan = dict(
        settings.PLAN["quick"], settings_decode=["decode:tiny:1"], settings_rounds=1, settings_tokens=4
    )
    ctx = _ctx(plan)
    settings.section(ctx)
    st = ctx.res["settings"]
    assert list(st["results"]) == [n for n, _ in calibrate.candidates()]
    assert st["base"]["decode"] == calibrate.option_of(calibrate.current_settings(), st["results"], "decode")
    (row,) = settings.rows(ctx.res)
    assert row["ours"] > 0 and row["anchor"] > 0 and row["ours_label"] == st["base"]["decode"]


def test_a_stored_kernel_off_choice_does_not_stop_the_next_calibration_trying_the_kernel(monkeypatch):
    """core.blas sets SMALL_GEMM=0 from a stored "kernel off" choice (listed in FAST_BLAS_AUTO);
    measuring again must still try the kernel. SMALL_GEMM=0 set by hand turns it off."""
    if not os.path.exists(blas.SMALL_GEMM_PATH):
        pytest.skip(f"{blas.SMALL_GEMM_PATH} is not built (make setup builds it)")
    monkeypatch.setenv("SMALL_GEMM", "0")
    monkeypatch.setenv(blas.AUTO_KEYS, "KMP_BLOCKTIME=200,SMALL_GEMM=0")
    assert calibrate.kernel_modes() == list(calibrate.KERNEL_MODES)
    monkeypatch.setenv(blas.AUTO_KEYS, "KMP_BLOCKTIME=200")
    assert calibrate.kernel_modes() == []
