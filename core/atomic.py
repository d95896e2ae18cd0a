"""Atomic writes: a reader sees the old file or the new one, never half of one.

`fsync` is the one way this repository flushes a file to the drive: on macOS `os.fsync` only
hands the data to the drive, whose cache a power loss can still lose; F_FULLFSYNC asks the
drive to write it (fcntl(2) on macOS). Elsewhere it is `os.fsync`.
"""

import fcntl
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)  # macOS only


def fsync(fd):
    """Flush the file behind `fd` to stable storage: F_FULLFSYNC where the platform has it
    (macOS), falling back to os.fsync where the file system refuses it (some network and
    FUSE file systems answer ENOTSUP/EINVAL); os.fsync elsewhere."""
    if FULLFSYNC is not None:
        try:
            fcntl.fcntl(fd, FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_file(path):
    with open(path, "rb") as f:
        fsync(f.fileno())


def fsync_dir(path):
    fd = os.open(str(path), os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private; outputs are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp_dir, final_dir):
    """Move a fully written (and fsynced) directory into place, replacing any old one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


STAGED_PREFIX = ".tmp-"


@contextmanager
def staged_dir(final_dir):
    """Write a folder atomically: yields an empty temporary folder next to `final_dir`
    (.tmp-NAME-PID); when the block ends normally, every file in it and the folder itself are
    fsynced and it is renamed into place (replace_dir), replacing an old one. When the block
    raises, the temporary folder is removed. A reader sees the old folder or the new one."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f"{STAGED_PREFIX}{final_dir.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        for f in sorted(tmp.rglob("*")):
            if f.is_file() and not f.is_symlink():
                fsync_file(f)
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), reverse=True):
            fsync_dir(d)
        fsync_dir(tmp)
        replace_dir(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
