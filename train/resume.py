"""Where a run starts, and what resuming puts back.

find_start chooses: the newest intact checkpoint of this run (refused when the setup's
fingerprint changed: start_from_run), the folder --resume names (a checkpoint, even of another
setup, or a plain adapter's weights: start_from_path), or step 0 (--fresh). In a distributed
run every process must choose the same (agree_on_start). Rank 0 then tidies the run folder:
starting over wipes the old outputs (wipe_run), resuming drops the checkpoints newer than the
start (tidy_run_folder). Restoring the trainer from the chosen checkpoint puts back its weights
and optimizer state (load_weights_and_optimizer) and its best/ adapter (restore_best).
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from core import atomic
from core.paths import step_name
from train import bundle, checkpoint
from train.exits import EXIT_CONFIG, Stop
from train.method import set_tree_leaves
from train.state import describe_changes, fingerprint_id


@dataclass
class Start:
    """A checkpoint to resume, or an adapter's weights to start from (--resume), or neither."""

    saved: checkpoint.Checkpoint | None = None
    warm_weights: dict | None = None
    warm_path: Path | None = None


def find_start(args, layout, inputs, dist):
    """The newest intact checkpoint, --resume PATH, or step 0; rank 0 tidies the run folder."""
    if args.resume:
        start = start_from_path(Path(args.resume), inputs.fingerprint, dist.log)
    elif args.fresh:
        start = Start()
    else:
        start = start_from_run(layout, inputs.fingerprint, dist)
    if dist.size > 1:
        agree_on_start(inputs.fingerprint, start, layout.run, dist)
    if dist.main:
        tidy_run_folder(layout, start, args.fresh, dist.log)
    return start


def start_from_path(path, current, log):
    """--resume: a checkpoint folder (even if the setup changed), or a plain adapter folder."""
    if (path / checkpoint.ADAPTERS).is_file() and not (path / checkpoint.STATE).exists():
        import mlx.core as mx

        weights = mx.load(str(path / checkpoint.ADAPTERS))
        mx.eval(weights)
        return Start(warm_weights=weights, warm_path=path)
    try:
        start = checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise Stop(f"error: cannot resume from {path}: {e}", EXIT_CONFIG) from None
    for change in describe_changes(start.state["fingerprint"], current):
        log(f"note: resuming {path} although {change}")
    return Start(saved=start)


def start_from_run(layout, current, dist):
    """The newest intact checkpoint of this run, refused when the setup changed."""
    if dist.main:
        checkpoint.clean_temp(layout.checkpoints)
    start = checkpoint.latest_valid(layout.checkpoints, log=lambda m: dist.log(f"warning: {m}"))
    if start is not None and (changes := describe_changes(start.state["fingerprint"], current)):
        raise Stop(
            f"error: {layout.run} has checkpoints (newest {start.path.name}) from a different "
            "setup, so it will not resume them:\n  "
            + "\n  ".join(changes)
            + "\nStart over with FRESH=1 (--fresh; deletes this run's checkpoints), choose "
            "another NAME, or continue anyway from a checkpoint with RESUME=path (--resume).",
            EXIT_CONFIG,
        )
    if start is None and checkpoint.list_steps(layout.checkpoints):
        dist.log(f"no usable checkpoint in {layout.checkpoints}; starting over")
    return Start(saved=start)


def already_complete(start, state, cfg, resume):
    """A finished run rerun (not with --resume): nothing to train, its outputs are rewritten."""
    return start.saved is not None and (start.saved.step >= cfg["iters"] or (state.done and not resume))


def tidy_run_folder(layout, start, fresh, log):
    """Starting over: the old outputs go. Resuming: checkpoints newer than the start go. And
    the temporary files of interrupted writes."""
    ckpt = start.saved
    if ckpt is None:
        if fresh or layout.metadata.exists() or layout.checkpoints.exists():
            log(f"starting over in {layout.run}")
        wipe_run(layout, log)
    elif ckpt.path.parent.resolve() != layout.checkpoints.resolve():  # another run's checkpoint
        wipe_run(layout, log)
    else:
        for removed in checkpoint.remove_newer(layout.checkpoints, ckpt.step):
            log(f"removed checkpoint {step_name(removed)} (newer than the one resumed)")
    for p in layout.run.iterdir() if layout.run.is_dir() else []:
        if p.name.startswith(atomic.STAGED_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)  # atomic.write_bytes' half-written file


def agree_on_start(current, start, run_dir, dist):
    """All processes must start from the same setup and the same checkpoint (or none); a
    process on another machine that sees another run folder would train something else."""
    if start.saved is not None:
        manifest = json.loads((start.saved.path / checkpoint.MANIFEST).read_text(encoding="utf-8"))
        sha = manifest["files"][checkpoint.ADAPTERS]["sha256"]
        mine = [fingerprint_id(current), start.saved.step, int(sha[:12], 16)]
    else:
        mine = [fingerprint_id(current), -2 if start.warm_weights is not None else -1, 0]
    views = dist.all_gather_ints(mine)
    if any(v[0] != views[0][0] for v in views):
        odd = [r for r, v in enumerate(views) if v[0] != views[0][0]]
        raise Stop(
            f"error: the processes do not have the same setup: rank(s) {odd} read other "
            "data, config or base model than rank 0. Every machine needs the same files at "
            "the same paths (data, config, base model).",
            EXIT_CONFIG,
        )
    if any(v[1:] != views[0][1:] for v in views):

        def what(v):
            return {-1: "no checkpoint", -2: "the --resume adapter"}.get(v[1], step_name(v[1]))

        seen = ", ".join(f"rank {r}: {what(v)}" for r, v in enumerate(views))
        raise Stop(
            f"error: the processes do not resume from the same checkpoint ({seen}). Every "
            f"process reads {run_dir}: across machines it must be on storage they all share "
            "(at the same path), or copy rank 0's run folder to the other machines before "
            "running again.",
            EXIT_CONFIG,
        )


def wipe_run(layout, log):
    """--fresh: this run's checkpoints, best and last adapters, outputs and metrics go."""
    for fname in bundle.OUTPUT_FILES:  # metadata.json first: no longer a finished bundle
        (layout.run / fname).unlink(missing_ok=True)
    for folder in (layout.checkpoints, layout.best, layout.last):
        shutil.rmtree(folder, ignore_errors=True)
    layout.metrics.unlink(missing_ok=True)
    if (layout.run / "fused").exists():
        log(
            f"note: {layout.run / 'fused'} is from the previous run (make fuse NAME={layout.name} to redo it)"
        )


# --------------------------------------------------------------------------- restoring


def load_warm_weights(model, start, weight_names, log):
    """--resume of a plain adapter folder: its weights into the model (the same names), step 0."""
    if set(start.warm_weights) != weight_names:
        raise Stop(
            f"error: {start.warm_path}/{checkpoint.ADAPTERS} does not fit this model and "
            "method (different fine_tune_type, num_layers or lora_parameters?)",
            EXIT_CONFIG,
        )
    model.load_weights(list(start.warm_weights.items()), strict=False)
    log(f"starting from the weights in {start.warm_path} (step 0, new optimizer state)")


def load_weights_and_optimizer(model, optimizer, ckpt, weight_names, log):
    """The checkpoint's trainable weights into the model (they must be the same names) and its
    optimizer state into the optimizer (started afresh when it does not fit)."""
    from mlx.utils import tree_flatten

    weights = ckpt.adapter_weights()
    if set(weights) != weight_names:
        raise Stop(
            f"error: {ckpt.path} holds different weights than this model and method "
            f"create ({len(set(weights) ^ weight_names)} names differ; changed "
            "fine_tune_type, num_layers or lora_parameters?)",
            EXIT_CONFIG,
        )
    model.load_weights(list(weights.items()), strict=False)
    opt_flat = ckpt.optimizer_state()
    if set(opt_flat) == {k for k, _ in tree_flatten(optimizer.state)}:
        set_tree_leaves(optimizer.state, opt_flat)
    else:
        log(
            f"warning: the optimizer state in {ckpt.path.name} does not fit this optimizer; starting it afresh"
        )


def restore_best(best, lineage_dir, best_dir, log):
    """After resuming: best/ must hold the adapter of the checkpoint's best step."""
    if best is None:
        shutil.rmtree(best_dir, ignore_errors=True)
        return
    src = Path(lineage_dir) / step_name(best["step"])
    if not src.is_dir():
        log(f"warning: the best checkpoint (step {best['step']}) is gone; best/ is left as it is")
        return
    want = json.loads((src / checkpoint.MANIFEST).read_text())["files"][checkpoint.ADAPTERS]["sha256"]
    have = best_dir / checkpoint.ADAPTERS
    if not have.is_file() or checkpoint.sha256_file(have) != want:
        checkpoint.write_adapter_dir(src, best_dir, {"best.json": best})
        log(f"best/ restored from {src.name}")
