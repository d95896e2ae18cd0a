"""Training checkpoints: save them (write_error says why one could not be), verify, find, load
and prune them.

A checkpoint is a folder models/NAME/checkpoints/step_XXXXXXX/ (paths.step_name) holding

    adapters.safetensors    the trainable weights (what mlx_lm.load_adapters reads)
    adapter_config.json     as mlx-lm writes it (fine_tune_type, num_layers, lora_parameters)
    optimizer.safetensors   tree_flatten(optimizer.state): step, learning rate, moments
    training_state.json     step, RNG state, data position, schedule, best, history, fingerprint
    manifest.json           size and sha256 of each file above; written last

It is written into a temporary folder, every file fsynced, then renamed into place
(atomic.staged_dir), so a reader sees a whole checkpoint or none. A checkpoint truncated or
corrupted afterwards fails the manifest check and is skipped in favour of the previous one.
"""

import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from core import atomic
from core.paths import ADAPTER_CONFIG, ADAPTERS, STEP_PREFIX, step_name  # noqa: F401 (ADAPTER*: re-read by callers)

FORMAT = 1
OPTIMIZER = "optimizer.safetensors"
STATE = "training_state.json"
MANIFEST = "manifest.json"
FILES = (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, STATE)
STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{7,}})$")
TMP_PREFIX = atomic.STAGED_PREFIX


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or corrupt; the message says why."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    def adapter_weights(self):
        import mlx.core as mx

        return mx.load(str(self.path / ADAPTERS))

    def optimizer_state(self):
        """The flat {dotted.key: array} optimizer state."""
        import mlx.core as mx

        return mx.load(str(self.path / OPTIMIZER))


# --------------------------------------------------------------------------- hashing


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dumps(obj):
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- save


def save(root, step, adapter_weights, adapter_config, optimizer_flat, state):
    """Write checkpoint `step` under `root` atomically; returns its folder."""
    import mlx.core as mx

    final = Path(root) / step_name(step)
    with atomic.staged_dir(final) as tmp:
        mx.save_safetensors(str(tmp / ADAPTERS), adapter_weights, metadata={"format": "mlx"})
        mx.save_safetensors(str(tmp / OPTIMIZER), optimizer_flat)
        (tmp / ADAPTER_CONFIG).write_text(dumps(adapter_config), encoding="utf-8")
        (tmp / STATE).write_text(dumps(dict(state, format=FORMAT, step=step)), encoding="utf-8")
        files = {
            name: {"size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in FILES
        }
        manifest = {"format": FORMAT, "step": step, "created_at": time.time(), "files": files}
        (tmp / MANIFEST).write_text(dumps(manifest), encoding="utf-8")
    return final


def write_error(root, step, e):
    """The message of checkpoint `step` that could not be written (save raised e): the cause,
    the free space, and the last complete checkpoint (nothing is lost)."""
    last = list_steps(root)
    free = shutil.disk_usage(root).free if root.exists() else None
    detail = (
        f"{e.strerror}{f' ({e.filename})' if e.filename else ''}"
        if isinstance(e, OSError) and e.strerror
        else str(e)
    )
    # mlx's writer raises a bare RuntimeError on a full disk: say what the free space shows.
    space = "" if free is None else f" ({free / 2**20:.0f} MiB free)"
    if free is not None and free < 16 * 2**20:
        space = f" - the disk is full{space}"
    return (
        f"error: cannot write the checkpoint of step {step} in {root}: {detail}"
        f"{space}. Nothing is lost: "
        f"the last complete checkpoint is {last[-1][1].name if last else 'none'}. Free "
        "disk space (or make the folder writable) and run the same command to continue "
        "from it."
    )


def write_adapter_dir(src_checkpoint, dst, extra=None):
    """Copy a checkpoint's adapter (weights + config) into `dst` atomically (best/, last/);
    `extra` is {filename: json-able object} written alongside."""
    src, dst = Path(src_checkpoint), Path(dst)
    with atomic.staged_dir(dst) as tmp:
        for name in (ADAPTERS, ADAPTER_CONFIG):
            shutil.copyfile(src / name, tmp / name)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(dumps(obj), encoding="utf-8")
    return dst


# --------------------------------------------------------------------------- verify / find


def verify(path):
    """Raise CheckpointError naming the first problem; return the parsed manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: no {MANIFEST} (incomplete checkpoint)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path.name}: unreadable {MANIFEST} ({e})") from None
    for name in FILES:
        if name not in files:
            raise CheckpointError(f"{path.name}: {MANIFEST} does not list {name}")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name}: {name} is missing")
        size = f.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(
                f"{path.name}: {name} is {size} bytes, the manifest says "
                f"{info.get('size')} (truncated or corrupt)"
            )
        if sha256_file(f) != info.get("sha256"):
            raise CheckpointError(f"{path.name}: {name} does not match its sha256 in the manifest (corrupt)")
    return manifest


def list_steps(root):
    """[(step, folder)] of the checkpoint folders under root, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def load(path):
    """Verify and read one checkpoint folder."""
    path = Path(path)
    manifest = verify(path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path.name}: unreadable {STATE} ({e})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: unsupported checkpoint format {state.get('format')!r}")
    return Checkpoint(path=path, step=int(manifest.get("step", state["step"])), state=state)


def latest_valid(root, log=print):
    """The newest checkpoint that passes verification, or None. Each newer one that fails
    is reported through `log` with the reason."""
    for _step, path in reversed(list_steps(root)):
        try:
            return load(path)
        except CheckpointError as e:
            log(f"checkpoint {path.name} is unusable: {e}; trying the previous one")
    return None


# --------------------------------------------------------------------------- housekeeping


def prune(root, keep_last, keep_steps=()):
    """Delete all but the newest `keep_last` checkpoints and those in keep_steps."""
    steps = list_steps(root)
    keep = {s for s, _ in steps[-max(int(keep_last), 1) :]} | {s for s in keep_steps if s is not None}
    removed = []
    for step, path in steps:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(step)
    return removed


def remove_newer(root, step):
    """Delete checkpoints after `step` (a different future, once we resume from `step`)."""
    removed = []
    for s, path in list_steps(root):
        if s > step:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(s)
    return removed


def clean_temp(root):
    """Remove half-written temporary folders left by an interrupted save."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX) or (
                p.name.startswith(f".{STEP_PREFIX}") and p.name.endswith(".old")
            ):
                shutil.rmtree(p, ignore_errors=True)
