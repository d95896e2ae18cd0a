"""Portability: what makes the project work on a stock Mac, tested on Linux.

- the Python finder `make setup` runs before .venv exists (.ci/find-python.sh);
- `make -n setup test` and the shell tests with neither `sha1sum` nor GNU `timeout` on PATH;
- the worker's parent-death watcher (macOS has no PR_SET_PDEATHSIG), with the prctl path off;
- the fsync helper every durable write goes through (F_FULLFSYNC on macOS).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker_harness import ROOT  # noqa: E402

from core import atomic  # noqa: E402

FINDER = ROOT / ".ci" / "find-python.sh"
GNU_ONLY = ("sha1sum", "timeout")


# --------------------------------------------------------------------- helpers


def path_without(tmp_path, names=GNU_ONLY):
    """A PATH of one folder: symlinks to every command on the current PATH but `names`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not os.path.isdir(folder):
            continue
        for entry in os.scandir(folder):
            link = bin_dir / entry.name
            if entry.name in names or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    for name in names:
        assert shutil.which(name, path=str(bin_dir)) is None
    return str(bin_dir)


def fake_python(folder, name, version):
    """A stand-in interpreter that reports `version` (pure logic: the finder's choice)."""
    folder.mkdir(parents=True, exist_ok=True)
    major, minor = version
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        f"# a fake {name} {major}.{minor}\n"
        f"case \"$*\" in *version_info*) echo '{major}.{minor}' ;; *) exit 3 ;; esac\n"
    )
    script.chmod(0o755)
    return script


def run_finder(path, **env):
    full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}
    full.update(env)
    return subprocess.run(["/bin/sh", str(FINDER)], env=full, capture_output=True, text=True, timeout=60)


def system_path_with(tmp_path, *fakes):
    """/bin and /usr/bin (sh, sed, ...) minus every python, plus the fake interpreters."""
    bin_dir = tmp_path / "sys"
    bin_dir.mkdir()
    for folder in ("/usr/bin", "/bin"):
        for entry in os.scandir(folder):
            link = bin_dir / entry.name
            if entry.name.startswith("python") or link.exists() or link.is_symlink():
                continue
            link.symlink_to(entry.path)
    fake_dir = tmp_path / "fake"
    for name, version in fakes:
        fake_python(fake_dir, name, version)
    return f"{fake_dir}{os.pathsep}{bin_dir}"


# --------------------------------------------------------------------- the Python finder


def test_finder_minimum_is_the_pinned_packages_requirement():
    """The finder's minimum is the highest Requires-Python of the pinned packages installed."""
    minimum = re.search(r"^MIN_MINOR=(\d+)", FINDER.read_text(), re.M)
    assert minimum, f"{FINDER}: no MIN_MINOR= line"
    from importlib.metadata import metadata

    needed = []
    for pkg in ("numpy", "mlx-lm", "transformers", "mlx"):
        req = metadata(pkg).get("Requires-Python") or ""
        m = re.search(r">=\s*3\.(\d+)", req)
        if m:
            needed.append(int(m.group(1)))
    assert max(needed) == int(minimum.group(1)), (needed, minimum.group(0))


def test_finder_picks_the_newest_suitable_python(tmp_path):
    path = system_path_with(tmp_path, ("python3", (3, 9)), ("python3.12", (3, 12)), ("python3.11", (3, 11)))
    proc = run_finder(path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "fake" / "python3.12")


def test_finder_takes_python3_when_it_is_new_enough(tmp_path):
    path = system_path_with(tmp_path, ("python3", (3, 13)))
    proc = run_finder(path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "fake" / "python3")


def test_finder_stops_with_one_line_naming_what_to_install(tmp_path):
    """A stock Mac: /usr/bin/python3 is 3.9 and nothing newer."""
    path = system_path_with(tmp_path, ("python3", (3, 9)), ("python3.10", (3, 10)))
    proc = run_finder(path)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Python >= 3.11" in lines[0] and "3.9" in lines[0] and "PYTHON3=" in lines[0], lines[0]
    assert "brew install python@" in lines[0] or "python.org" in lines[0]


def test_finder_honours_PYTHON3_and_refuses_an_old_one(tmp_path):
    path = system_path_with(tmp_path, ("python3.13", (3, 13)))
    old = fake_python(tmp_path / "elsewhere", "python3", (3, 9))
    proc = run_finder(path, PYTHON3=str(old))
    assert proc.returncode != 0 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and str(old) in proc.stderr and "3.9" in proc.stderr
    good = fake_python(tmp_path / "elsewhere2", "py", (3, 12))
    proc = run_finder(path, PYTHON3=str(good))
    assert proc.returncode == 0 and proc.stdout.strip() == str(good), proc.stderr
    proc = run_finder(path, PYTHON3=str(tmp_path / "missing"))
    assert proc.returncode != 0 and "not found" in proc.stderr


def test_finder_accepts_the_real_interpreter(tmp_path):
    """No fakes: the base interpreter of .venv (>= 3.11) is found as python3.X."""
    real = Path(sys.base_prefix) / "bin" / f"python3.{sys.version_info.minor}"
    if not real.exists():
        pytest.skip(f"{real} not found")
    path = system_path_with(tmp_path)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / real.name).symlink_to(real)
    proc = run_finder(path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "fake" / real.name)


# --------------------------------------------------------------------- no GNU-only tools


def test_make_n_setup_test_without_sha1sum_or_timeout(tmp_path):
    path = path_without(tmp_path)
    env = dict(os.environ, PATH=path)
    proc = subprocess.run(
        ["make", "-n", "setup", "test"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "command not found" not in proc.stderr and "No such file" not in proc.stderr, proc.stderr

    # the requirements hash (the stamp's name) is computed, and is the one sha1sum gives
    def stamp(env):
        out = subprocess.run(
            ["make", "-n", "setup", f"VENV={tmp_path / 'v'}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        return re.findall(r"^touch .*/\.setup-\S*-([0-9a-f]{12})$", out, re.M)

    assert stamp(env) == stamp(os.environ)
    assert len(stamp(env)) == 1


def test_make_n_setup_on_a_fresh_clone_runs_the_finder(tmp_path):
    """Before .venv exists: `make -n setup` shows the finder creating it."""
    path = path_without(tmp_path)
    proc = subprocess.run(
        ["make", "-n", "setup", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        env=dict(os.environ, PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert ".ci/find-python.sh" in proc.stdout and "-m venv" in proc.stdout, proc.stdout


def test_shell_tests_without_sha1sum_or_timeout(tmp_path, tiny_model):
    path = path_without(tmp_path)
    env = dict(os.environ, PATH=path, PY=sys.executable, FAST_BLAS_QUIET="1")
    proc = subprocess.run(
        ["bash", "tests/shell/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "command not found" not in out, out[-4000:]
    assert re.search(r"^\d+ passed, 0 failed$", proc.stdout, re.M), out[-2000:]


def test_shell_timeout_helper_kills_a_command_that_runs_too_long(tmp_path):
    path = path_without(tmp_path)
    script = (
        'source tests/shell/lib.sh; with_timeout 1 "$PY" -c "import time; time.sleep(30)"; '
        'echo "rc=$?"; with_timeout 30 "$PY" -c "import sys; sys.exit(7)"; echo "rc=$?"; '
        "echo hi | with_timeout 30 cat"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PATH=path, PY=sys.executable),
    )
    assert time.monotonic() - t0 < 25
    assert proc.stdout.split() == ["rc=124", "rc=7", "hi"], (proc.stdout, proc.stderr)


def test_shell_exit_status_survives_a_pipeline_without_lastpipe(tmp_path):
    """macOS's bash 3.2 runs `printf ... | run_worker` in a subshell: check_rc still sees the
    worker's exit status (2: the model cannot be loaded)."""
    script = (
        "source tests/shell/lib.sh; shopt -u lastpipe 2>/dev/null; "
        'printf "{}\\n" | run_worker "$TMP/o"; echo "outer=${WORKER_RC:-unset}"; check_rc 2 "$TMP/o"; '
        'printf "{}\\n" | run_worker "$TMP/o"; check_rc 0 "$TMP/o"; finish'
    )
    proc = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PY=sys.executable, MODEL=str(tmp_path / "no-model")),
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == "outer=unset", proc.stdout  # the subshell's variable is lost...
    assert lines[1] == "  ok: exit status 2", proc.stdout  # ...the recorded status is not
    assert lines[2].startswith("  FAIL: exit status 2, expected 0"), proc.stdout
    assert proc.returncode == 1


# --------------------------------------------------------------------- parent death

# The end-to-end parent-death tests (prctl and the getppid watcher alone) are in
# tests/test_worker_lifecycle.py.


def test_die_with_parent_chooses_prctl_only_where_it_exists(monkeypatch):
    import worker.__main__ as wm

    started = []
    monkeypatch.setattr(wm.threading, "Thread", lambda **kw: started.append(kw) or _NoThread())
    monkeypatch.setattr(wm, "_set_pdeathsig", lambda: True)  # not on the test process itself
    monkeypatch.delenv("WORKER_PARENT_WATCH", raising=False)
    expected = "prctl" if sys.platform.startswith("linux") else "watch"
    assert wm.die_with_parent() == expected
    assert wm.die_with_parent(use_prctl=False) == "watch"
    monkeypatch.setenv("WORKER_PARENT_WATCH", "poll")
    assert wm.die_with_parent() == "watch"
    assert [kw["target"] for kw in started] == [wm._watch_parent] * (2 if expected == "prctl" else 3)


class _NoThread:
    def start(self):
        pass


# --------------------------------------------------------------------- fsync


def test_fsync_helper_uses_full_fsync_where_the_platform_has_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(("fsync", fd)))
    monkeypatch.setattr(atomic.fcntl, "fcntl", lambda fd, op: calls.append(("fcntl", op)))
    monkeypatch.setattr(atomic, "FULLFSYNC", 51)  # macOS's F_FULLFSYNC
    atomic.write_text(tmp_path / "a.txt", "x")
    assert calls and all(c == ("fcntl", 51) for c in calls), calls  # the file and its folder
    calls.clear()

    def refuse(fd, op):
        raise OSError(45, "Operation not supported")  # e.g. a network volume

    monkeypatch.setattr(atomic.fcntl, "fcntl", refuse)
    atomic.write_text(tmp_path / "b.txt", "y")
    assert [c[0] for c in calls] == ["fsync", "fsync"]
    calls.clear()
    monkeypatch.setattr(atomic, "FULLFSYNC", None)  # Linux
    atomic.write_text(tmp_path / "c.txt", "z")
    assert [c[0] for c in calls] == ["fsync", "fsync"]
    assert (tmp_path / "c.txt").read_text() == "z"


def test_no_direct_os_fsync_outside_the_helper():
    offenders = []
    for folder in ("core", "train", "worker", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("atomic.py", "tiny_model.py"):  # tiny_model: a rebuildable test model
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if "os.fsync(" in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, f"use core.atomic.fsync: {offenders}"
