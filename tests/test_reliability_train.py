"""Training under faults (GitHub issue #7): kill -9 at chosen points, a full disk, a read-only
output folder. Real `python -m train.train` subprocesses on the tiny model (tests/helpers_train.py);
every run is compared with the uninterrupted reference run (the same one tests/test_train.py
uses): the final adapter and best/ within 1e-5, the same metrics steps.

Kill points are hit with inotify (Linux), not with sleeps: the test watches the run folder and
sends SIGKILL the moment the trainer creates the checkpoint's temporary folder, writes its
manifest, starts best/ or the final bundle. What was on disk at the kill is checked (a
half-written .tmp-step_* folder must be there), so the fault really was the one intended; a
kill that came too late is seen there and tried again on the folder as it was (kill_inside).
"""

import ctypes
import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_train import (  # noqa: E402
    PY,
    ROOT,
    env_for,
    load_weights,
    max_abs_diff,
    metrics,
    ok,
    reference_run,
    run_dir,
    run_train,
    shared_base,
    train_cmd,
)

from train import checkpoint  # noqa: E402

NAME = "run"
IN_MOVED_TO, IN_CREATE, IN_ISDIR, IN_IGNORED = 0x80, 0x100, 0x40000000, 0x8000


@pytest.fixture(scope="session")
def shared(tmp_path_factory, tiny_model):
    return shared_base(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(shared):
    return reference_run(shared)


def report(**figures):
    print("\nRELIABILITY " + json.dumps(figures, sort_keys=True), flush=True)


# ----------------------------------------------------------------------------- inotify
class Inotify:
    """The few inotify calls the kill points need (ctypes, no dependency)."""

    def __init__(self):
        if not sys.platform.startswith("linux"):
            pytest.skip("inotify is Linux-only")
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            pytest.skip(f"inotify_init1 failed: {os.strerror(ctypes.get_errno())}")
        self.paths = {}

    def watch(self, path, mask=IN_CREATE | IN_MOVED_TO):
        wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = Path(path)
        return wd

    def events(self, timeout):
        """[(folder, mask, name)] that arrived within timeout seconds."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 1 << 16)
        out, i = [], 0
        while i + 16 <= len(data):
            wd, mask, _cookie, n = struct.unpack_from("iIII", data, i)
            name = data[i + 16 : i + 16 + n].rstrip(b"\0").decode()
            i += 16 + n
            if not mask & IN_IGNORED and wd in self.paths:
                out.append((self.paths[wd], mask, name))
        return out

    def close(self):
        os.close(self.fd)


def kill_at(base, config, data, point, step=None, timeout=300, env=None):
    """Start a run and SIGKILL it at `point`:
      "step"      after metrics for `step` are on disk (between steps),
      "ckpt_tmp"  the moment the temporary folder of checkpoint `step` is created,
      "file:NAME" the moment file NAME is created in that folder (file:optimizer.safetensors:
                  the adapter is written, the optimizer state not yet; file:manifest.json: all
                  written, not yet renamed into place),
      "renamed"   the moment checkpoint `step` is renamed into place (before best/ and pruning),
      "best_tmp"  the moment best/'s temporary folder is created after checkpoint `step`,
      "bundle"    the moment the first output file of the final bundle is being written.
    Returns what was found on disk right after the kill."""
    out = run_dir(base, NAME)
    out.mkdir(parents=True, exist_ok=True)  # the trainer never removes the run folder
    ino = Inotify()
    ino.watch(out)
    if (out / "checkpoints").is_dir():  # a resumed run: the folder stays
        ino.watch(out / "checkpoints")
    proc = subprocess.Popen(
        train_cmd(config, NAME, data),
        cwd=ROOT,
        env=env or env_for(base),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = None if step is None else f"step_{step:07d}"
    metrics_file = base / "logs" / NAME / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    killed_at = None
    try:
        while proc.poll() is None and time.monotonic() < deadline and killed_at is None:
            for folder, mask, name in ino.events(0.02):
                if folder == out and name == "checkpoints" and mask & IN_CREATE:
                    ino.watch(out / "checkpoints")
                hit = None
                if folder.name == "checkpoints" and name.startswith(f"{checkpoint.TMP_PREFIX}{target}"):
                    if point == "ckpt_tmp":
                        hit = name
                    elif point.startswith("file:"):
                        ino.watch(folder / name, IN_CREATE)
                        if (folder / name / point[5:]).exists():  # created before the watch
                            hit = f"{name}/{point[5:]}"
                elif (
                    point.startswith("file:")
                    and folder.name.startswith(f"{checkpoint.TMP_PREFIX}{target}")
                    and name == point[5:]
                ):
                    hit = f"{folder.name}/{name}"
                elif (
                    point == "renamed"
                    and folder.name == "checkpoints"
                    and name == target
                    and mask & IN_MOVED_TO
                ):
                    hit = name
                elif (
                    point == "best_tmp"
                    and folder == out
                    and name.startswith(f"{checkpoint.TMP_PREFIX}best")
                    and _newest_step(out) == step
                ):
                    hit = name
                elif point == "bundle" and folder == out and mask & IN_CREATE and name.endswith(".tmp"):
                    hit = name
                if hit:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = hit
                    break
            if point == "step" and killed_at is None and metrics_file.exists():
                steps = [
                    json.loads(line)["step"]
                    for line in metrics_file.read_text().splitlines()
                    if line.endswith("}")
                ]
                if max(steps, default=-1) >= step:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = f"after step {max(steps)}"
        proc.wait(60)
        stderr = proc.stderr.read()
    finally:
        ino.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (
        f"no kill at {point} {step}: the run ended first\n{stderr[-3000:]}"
    )
    ckpts = out / "checkpoints"
    found = {
        "point": point,
        "step": step,
        "event": killed_at,
        "tmp_dirs": {
            p.name: sorted(f.name for f in p.iterdir())
            for p in (ckpts.iterdir() if ckpts.is_dir() else [])
            if p.name.startswith(checkpoint.TMP_PREFIX)
        },
        "complete": [p.name for s, p in checkpoint.list_steps(ckpts)],
    }
    for _, path in checkpoint.list_steps(ckpts):
        checkpoint.verify(path)  # a finished checkpoint folder is always whole
    return found


def _newest_step(out):
    steps = checkpoint.list_steps(out / "checkpoints")
    return steps[-1][0] if steps else None


def resume_and_compare(base, config, data, reference, shared):
    proc = ok(run_train(base, config, NAME, data))
    assert "resuming from" in proc.stderr, proc.stderr[-3000:]
    out = run_dir(base, NAME)
    diff = max_abs_diff(
        load_weights(reference / "adapters.safetensors"), load_weights(out / "adapters.safetensors")
    )
    best = max_abs_diff(
        load_weights(reference / "best" / "adapters.safetensors"),
        load_weights(out / "best" / "adapters.safetensors"),
    )
    assert diff <= 1e-5 and best <= 1e-5, (diff, best)
    assert [r["step"] for r in metrics(base, NAME)] == [r["step"] for r in metrics(shared / "ref", NAME)]
    return diff


def leftovers(base):
    """Temporary files and folders of interrupted writes still in the run folder."""
    out = run_dir(base, NAME)
    return [
        p.name
        for p in list((out / "checkpoints").iterdir()) + list(out.iterdir())
        if p.name.startswith((checkpoint.TMP_PREFIX, ".step_")) or p.name.endswith(".tmp")
    ]


# ----------------------------------------------------------------------------- kill -9
def in_the_write(step, has=(), lacks=()):
    """Whether a kill fell inside the write of checkpoint `step`: it is not in place, and its
    temporary folder holds the files `has` and none of `lacks`."""

    def inside(found):
        return f"step_{step:07d}" not in found["complete"] and any(
            set(has) <= set(files) and not set(lacks) & set(files) for files in found["tmp_dirs"].values()
        )

    return inside


def kill_inside(base, config, data, point, step, inside, attempts=3):
    """kill_at, tried again while the kill misses its window. The kill comes from outside, on an
    inotify event, and the rest of a checkpoint's write takes milliseconds, so on a loaded
    machine it can land after the manifest or the rename (the CI saw it once). A miss is visible
    on disk (`inside(found)` is false): the run folder is put back as it was before the attempt
    and the kill tried again. kill_at verifies the finished checkpoints of every attempt.
    Returns what the kill found, with the number of attempts."""
    before = base.with_name(base.name + ".before")
    shutil.rmtree(before, ignore_errors=True)
    if base.exists():
        shutil.copytree(base, before, symlinks=True)
    for attempt in range(1, attempts + 1):
        found = kill_at(base, config, data, point, step)
        if inside(found):
            return dict(found, attempts=attempt)
        shutil.rmtree(base)
        if before.exists():
            shutil.copytree(before, base, symlinks=True)
    pytest.fail(f"{attempts} kills at {point} {step} all missed their window: {found}")


def test_kill_9_during_a_checkpoint_write_then_resume(shared, reference, tmp_path):
    """SIGKILL while checkpoint N is half written (a random one of 10..20; its adapter file
    written, its optimizer state being written): the partial folder is left behind, never
    mistaken for a checkpoint, cleaned by the rerun, which resumes from N-5 and ends equal to
    the uninterrupted run."""
    seed = random.randrange(1 << 30)
    step = random.Random(seed).choice([10, 15, 20])
    base = tmp_path / "run"
    half_written = in_the_write(step, has=[checkpoint.ADAPTERS], lacks=[checkpoint.MANIFEST])
    point = f"file:{checkpoint.OPTIMIZER}"
    found = kill_inside(base, shared / "small.yaml", shared / "data", point, step, half_written)
    assert f"step_{step - 5:07d}" in found["complete"], found
    diff = resume_and_compare(base, shared / "small.yaml", shared / "data", reference, shared)
    report(test="train_kill_during_checkpoint", seed=seed, max_abs_diff=diff, **found)
    assert leftovers(base) == []


def best_checkpoint(shared):
    """A checkpoint step after which the run writes best/ (its validation loss beats every earlier
    one: the uninterrupted reference run's, which a resumed run repeats exactly): 25 if so, else
    the latest of 10, 15 and 30. Not 20, whose kill comes right after its rename, before best/."""
    best, improved = math.inf, []
    for r in metrics(shared / "ref", NAME):
        if r.get("val_loss") is not None and r["val_loss"] < best:
            best = r["val_loss"]
            improved.append(r["step"])
    candidates = [s for s in improved if s in (10, 15, 25, 30)]
    assert candidates, f"the reference run improves its validation loss only at steps {improved}"
    return 25 if 25 in candidates else max(candidates)


@pytest.mark.slow
def test_kill_9_at_many_points_of_one_run(shared, reference, tmp_path):
    """One run killed six times - between two steps, while a checkpoint folder is being
    written, after its manifest but before the rename, right after the rename, while best/ is
    written, and while the final bundle is written - and resumed after each: the end result
    equals the uninterrupted run."""
    rnd = random.Random(seed := random.randrange(1 << 30))
    plan = [
        ("step", rnd.randint(6, 9)),
        ("ckpt_tmp", 10),
        (f"file:{checkpoint.MANIFEST}", 15),
        ("renamed", 20),
        ("best_tmp", best_checkpoint(shared)),
        ("bundle", None),
    ]
    plan.sort(key=lambda p: math.inf if p[1] is None else p[1])  # stable: best_tmp after its step's
    kills = []
    windows = {  # the points a late kill can miss, what their folder holds (kill_inside)
        "ckpt_tmp": {},
        f"file:{checkpoint.MANIFEST}": {"has": [checkpoint.MANIFEST]},
    }
    for point, step in plan:
        if point in windows:
            inside = in_the_write(step, **windows[point])
            found = kill_inside(tmp_path, shared / "small.yaml", shared / "data", point, step, inside)
        else:
            found = kill_at(tmp_path, shared / "small.yaml", shared / "data", point, step)
        kills.append(found)
        if point == "renamed":
            assert f"step_{step:07d}" in found["complete"], found
    assert not (run_dir(tmp_path, NAME) / "metadata.json").exists()  # never a half-finished bundle
    diff = resume_and_compare(tmp_path, shared / "small.yaml", shared / "data", reference, shared)
    left = leftovers(tmp_path)
    report(
        test="train_kill_many",
        seed=seed,
        max_abs_diff=diff,
        leftovers=left,
        kills=[{k: v for k, v in f.items() if k != "complete"} for f in kills],
    )
    # A kill while the bundle is written leaves atomic.write_bytes' ".NAME.XXXX.tmp" files;
    # the rerun must remove them, as it removes the ".tmp-*" folders.
    assert left == [], f"temporary files left in {run_dir(tmp_path, NAME)}: {left}"


# ----------------------------------------------------------------------------- a full disk
FAILING_SAVE = r"""
import errno, os, sys
import train
from train import checkpoint
import mlx.core as mx

FAIL_STEP, CODE = int(os.environ["FAIL_STEP"]), getattr(errno, os.environ["FAIL_ERRNO"])
real_save, real_write = checkpoint.save, mx.save_safetensors

def failing_write(path, *args, **kwargs):
    # the adapters file is written; the optimizer state hits the full disk half way
    if str(path).endswith(checkpoint.OPTIMIZER):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise OSError(CODE, os.strerror(CODE), str(path))
    return real_write(path, *args, **kwargs)

def save(root, step, *args, **kwargs):
    if step != FAIL_STEP:
        return real_save(root, step, *args, **kwargs)
    mx.save_safetensors = failing_write
    try:
        return real_save(root, step, *args, **kwargs)
    finally:
        mx.save_safetensors = real_write

checkpoint.save = save
from train.train import main
sys.exit(main(sys.argv[1:]))
"""


def _after_a_failed_checkpoint(base, proc, fail_step):
    """The checks shared by the simulated and the real full disk."""
    out = run_dir(base, NAME)
    ckpts = out / "checkpoints"
    steps = [s for s, _ in checkpoint.list_steps(ckpts)]
    assert proc.returncode not in (0, -signal.SIGKILL), proc.stderr[-3000:]
    assert fail_step not in steps and fail_step - 5 in steps, (steps, proc.stderr[-2000:])
    checkpoint.verify(ckpts / f"step_{fail_step - 5:07d}")  # the previous one is intact
    assert not [p.name for p in ckpts.iterdir() if p.name.startswith(checkpoint.TMP_PREFIX)]
    assert not (out / "metadata.json").exists()
    return steps


NO_SPACE = ("no space left", "disk is full", "disk full", "free space", "out of space")
READ_ONLY = ("read-only",)


def _clear_error(stderr, cause):
    """A clear error (checked last, after the data): no traceback, and one message that
    names the checkpoint and the cause (one of the words in `cause`)."""
    tail = stderr[-3000:]
    assert "Traceback" not in stderr, f"a traceback instead of a clear error message:\n{tail}"
    lines = [line.lower() for line in stderr.splitlines()]
    assert any("checkpoint" in line and any(c in line for c in cause) for line in lines), (
        f"no message naming the checkpoint and the cause ({cause}):\n{tail}"
    )


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(shared, reference, tmp_path):
    """The optimizer file of checkpoint 15 fails with ENOSPC half way (in the trainer's
    process: checkpoint.save wrapped so mlx's writer raises). The run stops with a clear
    error, checkpoint 10 is intact and no partial folder is left; with space again, the same
    command resumes from 10 and ends equal to the uninterrupted run."""
    env = env_for(tmp_path, FAIL_STEP=15, FAIL_ERRNO="ENOSPC")
    cmd = [
        PY,
        "-c",
        FAILING_SAVE,
        "--config",
        str(shared / "small.yaml"),
        "--name",
        NAME,
        "--data",
        str(shared / "data"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    steps = _after_a_failed_checkpoint(tmp_path, proc, 15)
    stderr = proc.stderr
    again = ok(run_train(tmp_path, shared / "small.yaml", NAME, shared / "data"))
    assert f"resuming from {run_dir(tmp_path, NAME) / 'checkpoints' / 'step_0000010'}" in again.stderr
    diff = _compare_only(tmp_path, reference, shared)
    report(
        test="train_enospc_simulated",
        exit_code=proc.returncode,
        checkpoints_left=steps,
        max_abs_diff=diff,
        last_line=stderr.strip().splitlines()[-1][:200],
    )
    _clear_error(stderr, NO_SPACE)


def _compare_only(base, reference, shared):
    out = run_dir(base, NAME)
    diff = max_abs_diff(
        load_weights(reference / "adapters.safetensors"), load_weights(out / "adapters.safetensors")
    )
    assert diff <= 1e-5, diff
    assert [r["step"] for r in metrics(base, NAME)] == [r["step"] for r in metrics(shared / "ref", NAME)]
    return diff


def _mount_tmpfs(path, size):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): the real "
            "full-disk test needs it; the simulated one still runs"
        )


def _remount(path, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


@pytest.mark.slow
def test_a_real_full_disk_and_a_read_only_folder(shared, reference, tmp_path):
    """checkpoints/ on a 1.2 MB tmpfs: two checkpoints fit (about 0.5 MB each), the third hits
    a real ENOSPC. Then the folder is remounted read-only: the rerun cannot write its next
    checkpoint (EROFS). Each time: a clear error, the previous checkpoint intact; remounted
    large and writable, the same command ends equal to the uninterrupted run."""
    ckpts = run_dir(tmp_path, NAME) / "checkpoints"
    _mount_tmpfs(ckpts, "1200k")
    try:
        first = run_train(tmp_path, shared / "small.yaml", NAME, shared / "data")
        steps = _after_a_failed_checkpoint(tmp_path, first, 15)
        _remount(ckpts, "size=64m,ro")
        second = run_train(tmp_path, shared / "small.yaml", NAME, shared / "data")
        assert second.returncode not in (0, -signal.SIGKILL), second.stderr[-3000:]
        assert "Read-only file system" in second.stderr, second.stderr[-3000:]
        assert [s for s, _ in checkpoint.list_steps(ckpts)] == steps
        for _, p in checkpoint.list_steps(ckpts):
            checkpoint.verify(p)
        _remount(ckpts, "rw")
        again = ok(run_train(tmp_path, shared / "small.yaml", NAME, shared / "data"))
        assert "resuming from" in again.stderr
        diff = _compare_only(tmp_path, reference, shared)
        report(
            test="train_enospc_erofs_tmpfs",
            checkpoints_when_full=steps,
            max_abs_diff=diff,
            enospc_last_line=first.stderr.strip().splitlines()[-1][:200],
            erofs_last_line=second.stderr.strip().splitlines()[-1][:200],
        )
        _clear_error(first.stderr, NO_SPACE)
        _clear_error(second.stderr, READ_ONLY)
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], capture_output=True)
