"""Fine-tune a base model on the prepared chat data: LoRA by default, DoRA or full weights.

    python -m train.train --config train/config.yaml --name farense [--model M] [--data D]
        [--iters N] [--batch-size N|auto] [--learning-rate X] [--save-every N]
        [--eval-every N] [--seed N] [--patience N] [--lora-rank N] [--lora-layers N]
        [--set key=value ...] [--fresh] [--resume PATH] [--models-dir DIR] [--logs-dir DIR]

(`make train` builds this command from its variables.) The config's keys are mlx_lm.lora's;
the options above and --set override them. With a quantized base (e.g. 4-bit) LoRA is QLoRA.

The loop, top to bottom: load the base and the data -> add adapters -> resume from the
newest intact checkpoint (or start) -> pick the batch size -> for each step: seed the RNG
from (seed, step), take the next batches of the epoch's fixed order, forward/backward, stop
on a non-finite loss, update; report, evaluate, keep the best, checkpoint, stop early ->
write the bundle (bundle.py). Everything a step depends on is a function of the checkpoint,
so an interrupted run (Ctrl-C, kill -9, power loss) rerun with the same command ends where
an uninterrupted one ends.

Several processes (`make train NPROC=2`, `HOSTFILE=hosts.json`; train.launch starts them
through mlx.launch): each process (rank) takes its share of every batch (batches.shard), the
batch size is per process and the batches are those of the global batch (processes x
batch_size); the summed per-token loss is divided by the target count of the whole global batch
and the gradients are summed over the processes (mx.distributed.all_sum), so k processes with
batch_size b train like one with k x b (up to float rounding; with LoRA dropout each process
draws its own masks). Validation losses are summed the same way. batch_size auto: every
process probes, those on one machine splitting its memory, and the smallest wins. Only rank 0
writes checkpoints, logs, metrics and the bundle; every rank reads the same checkpoint
(models/NAME on one machine, or on storage all machines share). The number of processes is
part of the resume fingerprint. A process that crashes or loses its peers stops them all.

Outputs: models/NAME/ (adapter, best/, checkpoints/, metadata.json, ...), logs/NAME/metrics.jsonl.
Exit codes: 0 done; 2 bad configuration or refused resume; 3 non-finite loss; 4 another
process of a distributed run stopped or crashed (or its launcher is gone); 5 a checkpoint
could not be written (disk full, read-only folder); 130 interrupted.
Test hooks (environment): TRAIN_INJECT_NAN=train:STEP|val:STEP, TRAIN_STEP_DELAY_S=seconds.
"""

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from train import atomic, batches, bundle, checkpoint, memory, paths
from train.config import ConfigError, load_config

EXIT_CONFIG, EXIT_NAN, EXIT_PEER, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 4, 5, 130
FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")
# The config keys that decide the weights a run produces. A checkpoint made under other
# values (or other data, or another base model) is not resumed silently.
TRAJECTORY_KEYS = ("fine_tune_type", "num_layers", "lora_parameters", "mask_prompt", "optimizer",
                   "optimizer_config", "batch_size", "grad_accumulation_steps", "iters",
                   "learning_rate", "lr_schedule", "max_seq_length", "seed", "system_prompt")
# Command-line options -> config keys.
OPTION_KEYS = {"model": "model", "data": "data", "iters": "iters", "batch_size": "batch_size",
               "learning_rate": "learning_rate", "save_every": "save_every",
               "eval_every": "steps_per_eval", "seed": "seed", "patience": "patience",
               "lora_rank": "lora_parameters.rank", "lora_layers": "num_layers"}


class Stop(Exception):
    """Ends the run with a message and an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def log(message, every_rank=False):
    """Progress on stderr. In a distributed run rank 0 speaks for the run; the other ranks
    only report errors and warnings (and what every_rank asks for), prefixed with their rank."""
    if DIST.rank == 0:
        print(f"train: {message}", file=sys.stderr, flush=True)
    elif every_rank or message.startswith(("error", "warning")):
        print(f"train[rank {DIST.rank}]: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- several processes

class PeerLost(Exception):
    """A collective operation failed: another process of the run is gone."""


class Dist:
    """The processes of this run: size 1 on its own, else mlx.launch's group (mx.distributed)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @classmethod
    def from_environment(cls):
        """Join the run mlx.launch started (it sets MLX_RANK); size 1 otherwise."""
        if os.environ.get("MLX_RANK") is None:
            return cls()
        hostfile = os.environ.get("MLX_HOSTFILE")
        if hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip():
            return cls()                                  # mlx.launch -n 1: a ring of one
        import mlx.core as mx
        group = mx.distributed.init(strict=True)
        return cls(group) if group.size() > 1 else cls()

    def _eval(self, what, *arrays):
        import mlx.core as mx
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            raise PeerLost(f"{what}: {e}") from None
        return arrays

    def all_sum_floats(self, values):
        """Sums of a few Python numbers over the processes (float64)."""
        import mlx.core as mx
        if self.size == 1:
            return list(values)
        (out,) = self._eval("all_sum", mx.distributed.all_sum(mx.array(values, dtype=mx.float64),
                                                             group=self.group, stream=mx.cpu))
        return out.tolist()

    def all_gather_ints(self, values):
        """[[rank 0's values], [rank 1's], ...] of a few integers per process."""
        import mlx.core as mx
        if self.size == 1:
            return [list(values)]
        (out,) = self._eval("all_gather", mx.distributed.all_gather(
            mx.array(values, dtype=mx.int64).reshape(1, -1), group=self.group, stream=mx.cpu))
        return out.tolist()

    def sum_tree(self, tree, group_bytes=32 << 20):
        """The sum over the processes of a tree of arrays (the gradients), evaluated: arrays of
        one dtype concatenated into a few all_sum calls, as nn.average_gradients does, without
        its division by the number of processes."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        chunks, current, nbytes = [], [], 0
        for key, value in flat:
            if current and (nbytes >= group_bytes or current[-1][1].dtype != value.dtype):
                chunks.append(current)
                current, nbytes = [], 0
            current.append((key, value))
            nbytes += value.nbytes
        if current:
            chunks.append(current)
        out = []
        for chunk in chunks:
            big = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in chunk]),
                                         group=self.group)
            offsets = np.cumsum([v.size for _, v in chunk])[:-1].tolist()
            out.extend((k, part.reshape(v.shape)) for (k, v), part in zip(chunk, mx.split(big, offsets)))
        summed = tree_unflatten(out)
        self._eval("all_sum of the gradients", [v for _, v in out])
        return summed

    def watch_launcher(self):
        """Exit when this process is orphaned (its launcher was killed): a rank left alone
        would otherwise keep training, or wait, for nobody."""
        parent = os.getppid()
        launcher = os.environ.get("TRAIN_LAUNCH_PID")
        same_host = os.environ.get("TRAIN_LAUNCH_HOST") == socket.gethostname()
        launcher = int(launcher) if launcher and launcher.isdigit() and same_host else None

        def alive(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            return True

        def loop():
            while True:
                time.sleep(0.5)
                if os.getppid() != parent or (launcher is not None and not alive(launcher)):
                    log("error: the launcher (train.launch / mlx.launch) is gone; stopping. Run "
                        "the same command to continue from the last checkpoint.", every_rank=True)
                    os._exit(EXIT_PEER)

        threading.Thread(target=loop, name="watch-launcher", daemon=True).start()


DIST = Dist()


# --------------------------------------------------------------------------- configuration

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(paths.CONFIG), help="YAML config (default train/config.yaml)")
    p.add_argument("--name", default="farense", help="run name: outputs in models/NAME, logs/NAME")
    p.add_argument("--model", help="base model: a local folder or a Hugging Face id")
    p.add_argument("--data", help="folder with train.jsonl and valid.jsonl")
    p.add_argument("--iters", help="optimizer steps")
    p.add_argument("--batch-size", help="examples per batch (per process when distributed), or auto")
    p.add_argument("--learning-rate", help="peak learning rate")
    p.add_argument("--save-every", help="checkpoint every N steps")
    p.add_argument("--eval-every", help="validation loss every N steps (steps_per_eval)")
    p.add_argument("--seed")
    p.add_argument("--patience", help="stop after N evaluations without improvement (0: never)")
    p.add_argument("--lora-rank")
    p.add_argument("--lora-layers", help="blocks adapted, from the top (-1: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, dotted for nested ones (lr_schedule.warmup=100); repeatable")
    p.add_argument("--fresh", action="store_true", help="start over, deleting this run's checkpoints and outputs")
    p.add_argument("--resume", metavar="PATH", help="continue from this checkpoint folder (even if the config changed)")
    p.add_argument("--models-dir", help="where run folders go (default models/, or $MODELS_DIR)")
    p.add_argument("--logs-dir", help="where logs go (default logs/, or $LOGS_DIR)")
    return p.parse_args(argv)


def resolve_config(args):
    if args.config and not Path(args.config).is_file():
        raise ConfigError(f"{args.config}: no such config file")
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value
    for option, key in OPTION_KEYS.items():
        if getattr(args, option) is not None:
            overrides[key] = getattr(args, option)
    cfg = load_config(args.config, overrides)
    check_config(cfg)
    return cfg


def check_config(cfg):
    def need(ok, key, what):
        if not ok:
            raise ConfigError(f"{key} must be {what}, got {_get(cfg, key)!r}")

    def is_int(v, lo):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(cfg["fine_tune_type"] in FINE_TUNE_TYPES, "fine_tune_type", "one of " + ", ".join(FINE_TUNE_TYPES))
    need(str(cfg["optimizer"]).lower() in OPTIMIZERS, "optimizer", "one of " + ", ".join(OPTIMIZERS))
    need(cfg["batch_size"] == "auto" or is_int(cfg["batch_size"], 1), "batch_size", "a positive integer or auto")
    for key in ("iters", "grad_accumulation_steps", "save_every", "steps_per_eval",
                "steps_per_report", "keep_last"):
        need(is_int(cfg[key], 1), key, "a positive integer")
    need(is_int(cfg["max_seq_length"], 2), "max_seq_length", "an integer >= 2")
    need(is_int(cfg["patience"], 0), "patience", "an integer >= 0")
    need(is_int(cfg["seed"], 0), "seed", "an integer >= 0")
    need(is_int(cfg["val_batches"], -1), "val_batches", "-1 (all) or an integer >= 0")
    need(is_num(cfg["learning_rate"]) and cfg["learning_rate"] > 0, "learning_rate", "a positive number")
    need(is_num(cfg["min_delta"]) and cfg["min_delta"] >= 0, "min_delta", "a number >= 0")
    need(isinstance(cfg["num_layers"], int) and (cfg["num_layers"] == -1 or cfg["num_layers"] >= 1),
         "num_layers", "-1 (all) or a positive integer")
    need(cfg["system_prompt"] is None or isinstance(cfg["system_prompt"], str), "system_prompt", "a string or null")
    if cfg["fine_tune_type"] != "full":
        lp = cfg["lora_parameters"]
        need(is_int(lp.get("rank"), 1), "lora_parameters.rank", "a positive integer")
        need(is_num(lp.get("scale")), "lora_parameters.scale", "a number")
        need(is_num(lp.get("dropout")) and 0 <= lp["dropout"] < 1, "lora_parameters.dropout", "in [0, 1)")
    sched = cfg["lr_schedule"]
    need(sched is None or isinstance(sched, dict), "lr_schedule", "a mapping or null")
    if sched and sched.get("arguments") is None:
        need(sched.get("name") in (None, "cosine", "constant"), "lr_schedule.name",
             "cosine or constant (or an mlx-lm schedule with arguments)")
        need(is_int(sched.get("warmup") or 0, 0), "lr_schedule.warmup", "an integer >= 0")
        if (sched.get("warmup") or 0) >= cfg["iters"]:
            log(f"note: lr_schedule.warmup ({sched['warmup']}) >= iters ({cfg['iters']}): the "
                "learning rate never reaches its peak")
    ab = cfg["auto_batch"]
    need(is_int(ab.get("max_batch_size"), 1), "auto_batch.max_batch_size", "a positive integer")
    need(is_num(ab.get("memory_fraction")) and 0 < ab["memory_fraction"] <= 1,
         "auto_batch.memory_fraction", "in (0, 1]")


def _get(cfg, dotted):
    node = cfg
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


# --------------------------------------------------------------------------- method and optimizer

def add_adapters(model, cfg):
    """Freeze the base and make the chosen part trainable; returns lora_config.json's data."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import get_total_parameters

    n_layers = len(model.layers)
    num_layers = cfg["num_layers"]
    if num_layers > n_layers:
        raise ConfigError(f"num_layers is {num_layers} but the model has only {n_layers} layers")
    model.freeze()
    if cfg["fine_tune_type"] == "full":
        for layer in model.layers[-max(num_layers, 0):]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, dict(cfg["lora_parameters"]),
                              use_dora=cfg["fine_tune_type"] == "dora")
    if cfg["grad_checkpoint"]:
        from mlx_lm.tuner.trainer import grad_checkpoint
        grad_checkpoint(model.layers[0])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    adapted = sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(model.trainable_parameters())})
    return {
        "fine_tune_type": cfg["fine_tune_type"],
        "num_layers": num_layers,
        "lora_parameters": None if cfg["fine_tune_type"] == "full" else dict(cfg["lora_parameters"]),
        "trainable_parameters": int(trainable),
        "total_parameters": int(get_total_parameters(model)),
        "adapted_modules": adapted,
    }


def learning_rate_schedule(cfg):
    """A float, or a function of the optimizer's step count (the updates done so far)."""
    import mlx.core as mx

    lr, sched = float(cfg["learning_rate"]), cfg["lr_schedule"]
    if not sched or sched.get("name") in (None, "constant"):
        return lr
    if sched.get("arguments") is not None:           # an mlx-lm schedule, as mlx_lm.lora builds it
        from mlx_lm.tuner.utils import build_schedule
        return build_schedule(sched)
    warmup, min_lr = int(sched.get("warmup") or 0), float(sched.get("min_lr") or 0.0)
    warmup_init = float(sched.get("warmup_init") or 0.0)
    decay_steps = max(cfg["iters"] - warmup, 1)

    def schedule(step):
        t = step.astype(mx.float32)
        progress = mx.clip((t - warmup) / decay_steps, 0.0, 1.0)
        cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + mx.cos(math.pi * progress))
        if warmup == 0:
            return cosine
        return mx.where(t < warmup, warmup_init + (lr - warmup_init) * (t + 1) / warmup, cosine)

    return schedule


def make_optimizer(cfg):
    import mlx.optimizers as optim

    name = str(cfg["optimizer"]).lower()
    cls = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD,
           "adafactor": optim.Adafactor, "muon": optim.Muon}[name]
    return cls(learning_rate=learning_rate_schedule(cfg), **(cfg["optimizer_config"].get(name) or {}))


def set_tree_leaves(tree, flat):
    """Put {dotted.path: value} into a nested dict/list tree in place."""
    for key, value in flat.items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value


def step_seed(seed, step):
    """The seed of the RNG (LoRA dropout) at a step: a function of (seed, step) only."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint32)[0])


def rank_step_seed(seed, step, rank):
    """The same for process `rank` of a distributed run: each one draws its own dropout masks
    for its share of the batch (so dropout differs from a single process's, and the runs
    agree only in distribution when lora_parameters.dropout > 0)."""
    if rank == 0:
        return step_seed(seed, step)
    return int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1, np.uint32)[0])


def sum_loss(model, batch, lengths, global_count):
    """default_loss in its sum form: (this share's loss sum / the global batch's target count,
    the loss sum). mlx-lm's default_loss returns the mean over this share's targets, which
    would weigh the processes' shares equally instead of by their targets."""
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    total = (nn.losses.cross_entropy(logits, targets) * mask).astype(mx.float32).sum()
    return total / global_count, total


# --------------------------------------------------------------------------- resume helpers

def fingerprint(cfg, train_split, valid_split, base_hash, world_size=1):
    config = {k: cfg[k] for k in TRAJECTORY_KEYS}
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {"config": config, "config_sha256": hashlib.sha256(canonical).hexdigest(),
            "data": {"train": train_split.info, "valid": valid_split.info},
            "base_model": {"name": cfg["model"], "hash": base_hash},
            "world_size": world_size}


def fingerprint_id(fp):
    """48 bits that differ when the trajectory differs (the processes of a run compare them)."""
    key = [fp["config_sha256"], fp["data"]["train"]["sha256"], fp["data"]["valid"]["sha256"],
           fp["base_model"]["hash"], fp.get("world_size", 1)]
    return int(hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12], 16)


def host_id():
    return int(hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12], 16)


def agree_on_start(current, start, warm, run_dir):
    """All processes must start from the same setup and the same checkpoint (or none); a
    process on another machine that sees another run folder would train something else."""
    if start is not None:
        manifest = json.loads((start.path / checkpoint.MANIFEST).read_text(encoding="utf-8"))
        sha = manifest["files"][checkpoint.ADAPTERS]["sha256"]
        mine = [fingerprint_id(current), start.step, int(sha[:12], 16)]
    else:
        mine = [fingerprint_id(current), -2 if warm else -1, 0]
    views = DIST.all_gather_ints(mine)
    if any(v[0] != views[0][0] for v in views):
        odd = [r for r, v in enumerate(views) if v[0] != views[0][0]]
        raise Stop(f"error: the processes do not have the same setup: rank(s) {odd} read other "
                   "data, config or base model than rank 0. Every machine needs the same files at "
                   "the same paths (data, config, base model).", EXIT_CONFIG)
    if any(v[1:] != views[0][1:] for v in views):
        def what(v):
            return {-1: "no checkpoint", -2: "the --resume adapter"}.get(v[1], f"step_{v[1]:07d}")
        seen = ", ".join(f"rank {r}: {what(v)}" for r, v in enumerate(views))
        raise Stop(f"error: the processes do not resume from the same checkpoint ({seen}). Every "
                   f"process reads {run_dir}: across machines it must be on storage they all share "
                   "(at the same path), or copy rank 0's run folder to the other machines before "
                   "running again.", EXIT_CONFIG)


def describe_changes(old, new):
    """What differs between a checkpoint's fingerprint and this run's, one line each."""
    changes = []
    for key in TRAJECTORY_KEYS:
        a, b = old["config"].get(key), new["config"].get(key)
        if a != b:
            changes.append(f"{key}: {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}")
    for split in ("train", "valid"):
        a, b = old["data"].get(split) or {}, new["data"][split]
        if a.get("sha256") != b["sha256"]:
            changes.append(f"{split} data changed: {b['path']} ({a.get('count')} -> {b['count']} "
                           f"conversations, sha256 {str(a.get('sha256'))[:12]} -> {str(b['sha256'])[:12]})")
    a, b = old["base_model"], new["base_model"]
    if a.get("hash") != b.get("hash"):
        changes.append(f"base model changed: {a.get('name')} -> {b.get('name')} "
                       f"(hash {str(a.get('hash'))[:12]} -> {str(b.get('hash'))[:12]})")
    a, b = old.get("world_size", 1), new.get("world_size", 1)
    if a != b:
        changes.append(f"processes (NPROC / HOSTFILE hosts): {a} -> {b} (batch_size is per "
                       f"process, so each step's batch changes: {a} x batch_size -> {b} x batch_size)")
    return changes


def wipe_run(name):
    """--fresh: this run's checkpoints, best adapter, outputs and metrics go."""
    run = paths.run_dir(name)
    for fname in bundle.OUTPUT_FILES:          # metadata.json first: no longer a finished bundle
        (run / fname).unlink(missing_ok=True)
    for folder in (paths.checkpoints_dir(name), paths.best_dir(name)):
        shutil.rmtree(folder, ignore_errors=True)
    paths.metrics_file(name).unlink(missing_ok=True)
    if (run / "fused").exists():
        log(f"note: {run / 'fused'} is from the previous run (make fuse NAME={name} to redo it)")


def restore_best(best, lineage_dir, best_dir):
    """After resuming: best/ must hold the adapter of the checkpoint's best step."""
    if best is None:
        shutil.rmtree(best_dir, ignore_errors=True)
        return
    src = Path(lineage_dir) / f"step_{best['step']:07d}"
    if not src.is_dir():
        log(f"warning: the best checkpoint (step {best['step']}) is gone; best/ is left as it is")
        return
    want = json.loads((src / checkpoint.MANIFEST).read_text())["files"][checkpoint.ADAPTERS]["sha256"]
    have = best_dir / checkpoint.ADAPTERS
    if not have.is_file() or checkpoint.sha256_file(have) != want:
        checkpoint.write_adapter_dir(src, best_dir, {"best.json": best})
        log(f"best/ restored from {src.name}")


def keep_metrics_until(path, step):
    """After resuming from `step`, drop what the interrupted run logged later."""
    records = [r for r in bundle.read_metrics(path) if r.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class NoMetrics:
    """What the other processes of a distributed run write: nothing (rank 0 logs)."""

    def write(self, record):
        pass


class Metrics:
    """logs/NAME/metrics.jsonl, one JSON object per report, each line flushed to disk."""

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record):
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        atomic.fsync(self.f.fileno())


def fmt_time(seconds):
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


# --------------------------------------------------------------------------- the run

def main(argv=None):
    global DIST
    args = parse_args(argv)
    if args.models_dir:
        paths.MODELS = Path(args.models_dir).resolve()
    if args.logs_dir:
        paths.LOGS = Path(args.logs_dir).resolve()
    if os.environ.get("MLX_RANK") is not None:          # started by mlx.launch (train.launch)
        # train.launch starts mlx.launch with Ctrl-C ignored (the ranks handle it), and the
        # ranks inherit that: take it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            DIST = Dist.from_environment()
        except Exception as e:
            log(f"error: cannot join the distributed run (rank {os.environ.get('MLX_RANK')}): "
                f"{type(e).__name__}: {e}", every_rank=True)
            return EXIT_PEER
        if DIST.size > 1:
            DIST.watch_launcher()
            log(f"process {DIST.rank} of {DIST.size}: pid {os.getpid()} on {socket.gethostname()}",
                every_rank=True)
    try:
        return run(args)
    except ConfigError as e:
        leaving()
        log(f"error: {e}", every_rank=True)
        return EXIT_CONFIG
    except Stop as e:
        leaving()
        # NaN and interruptions are decided together (the loss and the stop flag are summed
        # over the processes): rank 0 reports them for all.
        if DIST.rank == 0 or e.code not in (EXIT_NAN, EXIT_INTERRUPTED):
            log(str(e), every_rank=True)
        if DIST.size > 1 and e.code in (EXIT_NAN, EXIT_INTERRUPTED):
            # Leave together, once rank 0 has saved: mlx.launch stops the others when one
            # exits with an error, and that must not cut rank 0's checkpoint short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                DIST.all_sum_floats([0.0])
            except PeerLost:
                pass
        return e.code
    except PeerLost as e:
        leaving()
        log(f"error: lost contact with the other processes of this run ({e}); another one "
            "stopped or crashed (see the messages above). This process stops too; run the same "
            "command to continue from the last checkpoint.", every_rank=True)
        return EXIT_PEER
    except KeyboardInterrupt:
        leaving()
        log("interrupted; run the same command to continue from the last checkpoint")
        return EXIT_INTERRUPTED


def leaving():
    """A distributed process on its way out with its message: when another process exits
    first, mlx.launch sends the rest SIGTERM, which must not cut the message (or rank 0's
    last checkpoint) short."""
    if DIST.size > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run(args):
    cfg = resolve_config(args)
    name = args.name
    run_dir, ckpt_root = paths.run_dir(name), paths.checkpoints_dir(name)
    inject = os.environ.get("TRAIN_INJECT_NAN", "")            # test hook: "train:12" / "val:20"
    inject = (inject.split(":")[0], int(inject.split(":")[1])) if ":" in inject else (None, None)
    step_delay = float(os.environ.get("TRAIN_STEP_DELAY_S") or 0)   # test hook

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_map, tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.trainer import default_loss

    main_rank = DIST.rank == 0            # the one that writes (checkpoints, metrics, bundle)

    # ---- 1. the base model and the data -------------------------------------------------
    log(f"loading {cfg['model']}")
    try:
        model, tokenizer, model_config = load(cfg["model"], return_config=True,
                                              tokenizer_config={"trust_remote_code": cfg["trust_remote_code"]},
                                              trust_remote_code=cfg["trust_remote_code"])
    except Exception as e:
        raise Stop(f"error: cannot load the base model {cfg['model']!r}: {type(e).__name__}: {e}", EXIT_CONFIG)
    base_hash, base_hash_method = bundle.base_model_hash(cfg["model"])

    data_dir = Path(cfg["data"])
    train_split = batches.read_split(data_dir / "train.jsonl")
    valid_split = batches.read_split(data_dir / "valid.jsonl")
    if not train_split.conversations:
        raise Stop(f"error: no training data in {data_dir / 'train.jsonl'} (run `make data`)", EXIT_CONFIG)
    data_system = batches.common_system_prompt(train_split.conversations)
    system_prompt = cfg["system_prompt"] if cfg["system_prompt"] is not None else data_system
    if cfg["system_prompt"] is not None and data_system is not None and data_system != cfg["system_prompt"]:
        log("warning: the training conversations carry a different system prompt than the config's; "
            "the worker will add the config's to conversations without one")
    encoded = {}
    for split in (train_split, valid_split):
        enc = batches.encode(tokenizer, split.conversations, system_prompt, cfg["mask_prompt"],
                             cfg["max_seq_length"])
        if enc.truncated or enc.dropped:
            log(f"{split.path}: {enc.truncated} conversation(s) cut to max_seq_length "
                f"{cfg['max_seq_length']}, {enc.dropped} dropped (no answer token left)")
        encoded[split.path] = enc.examples
    train_set, valid_set = encoded[train_split.path], encoded[valid_split.path]
    if not train_set:
        raise Stop("error: no usable training example (all longer than max_seq_length?)", EXIT_CONFIG)
    if not valid_set:
        log("warning: no validation data; no validation loss, best/ or early stopping")

    # ---- 2. the method: adapters on the top num_layers blocks, or full weights ----------
    mx.random.seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    random.seed(cfg["seed"])
    lora_info = add_adapters(model, cfg)
    lora_info["base_quantized"] = bool(model_config.get("quantization"))
    if lora_info["base_quantized"] and cfg["fine_tune_type"] == "full":
        log("warning: full fine-tuning of a quantized base trains only its non-quantized weights")
    method = "QLoRA" if lora_info["base_quantized"] and cfg["fine_tune_type"] == "lora" else cfg["fine_tune_type"]
    log(f"{method}: {lora_info['trainable_parameters']:,} trainable of "
        f"{lora_info['total_parameters']:,} parameters ({len(lora_info['adapted_modules'])} modules)")

    # ---- 3. where to start: the newest intact checkpoint, --resume PATH, or step 0 ------
    current = fingerprint(cfg, train_split, valid_split, base_hash, DIST.size)
    start, warm_weights = None, None
    if args.resume:
        resume_path = Path(args.resume)
        if (resume_path / checkpoint.ADAPTERS).is_file() and not (resume_path / checkpoint.STATE).exists():
            warm_weights = mx.load(str(resume_path / checkpoint.ADAPTERS))   # a plain adapter folder
            mx.eval(warm_weights)
        else:
            try:
                start = checkpoint.load(resume_path)
            except checkpoint.CheckpointError as e:
                raise Stop(f"error: cannot resume from {resume_path}: {e}", EXIT_CONFIG)
            for change in describe_changes(start.state["fingerprint"], current):
                log(f"note: resuming {resume_path} although {change}")
    elif not args.fresh:
        if main_rank:
            checkpoint.clean_temp(ckpt_root)
        start = checkpoint.latest_valid(ckpt_root, log=lambda m: log(f"warning: {m}"))
        if start is not None and (changes := describe_changes(start.state["fingerprint"], current)):
            raise Stop(
                f"error: {run_dir} has checkpoints (newest {start.path.name}) from a different "
                "setup, so it will not resume them:\n  " + "\n  ".join(changes) +
                "\nStart over with FRESH=1 (--fresh; deletes this run's checkpoints), choose "
                "another NAME, or continue anyway from a checkpoint with RESUME=path (--resume).",
                EXIT_CONFIG)
        if start is None and checkpoint.list_steps(ckpt_root):
            log(f"no usable checkpoint in {ckpt_root}; starting over")
    if DIST.size > 1:
        agree_on_start(current, start, warm_weights is not None, run_dir)
    if not main_rank:
        pass                                                     # rank 0 tidies the run folder
    elif start is None:
        if args.fresh or (run_dir / "metadata.json").exists() or ckpt_root.exists():
            log(f"starting over in {run_dir}")
        wipe_run(name)
    elif start.path.parent.resolve() != ckpt_root.resolve():     # another run's checkpoint
        wipe_run(name)
    else:
        for removed in checkpoint.remove_newer(ckpt_root, start.step):
            log(f"removed checkpoint step_{removed:07d} (newer than the one resumed)")
    for p in (run_dir.iterdir() if run_dir.is_dir() and main_rank else []):
        if p.name.startswith(checkpoint.TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)

    # ---- 4. the batch size ----------------------------------------------------------------
    loss_and_grad = nn.value_and_grad(model, default_loss)
    if start is not None and cfg["batch_size"] == "auto" and start.state.get("batch_size"):
        batch_size = int(start.state["batch_size"])
        log(f"batch_size auto: {batch_size} (as chosen when this run started)")
    elif cfg["batch_size"] == "auto":
        extra = memory.optimizer_state_bytes(model, str(cfg["optimizer"]).lower())
        max_batch_size = cfg["auto_batch"]["max_batch_size"]
        memory_fraction = cfg["auto_batch"]["memory_fraction"]
        if DIST.size > 1:
            # Every process probes at once; those on one machine share its memory. The run
            # takes the smallest choice, so it fits everywhere.
            hosts = [h for (h,) in DIST.all_gather_ints([host_id()])]
            here = hosts.count(host_id())
            memory_fraction /= here
            max_batch_size = max(1, min(max_batch_size, len(train_set) // DIST.size))
        batch_size, why = memory.probe(model, loss_and_grad, train_set, batches.collate,
                                       max_batch_size=max_batch_size,
                                       memory_fraction=memory_fraction,
                                       extra_bytes=extra, log=log)
        if DIST.size > 1:
            chosen = [b for (b,) in DIST.all_gather_ints([batch_size])]
            batch_size = min(chosen)
            why = (f"per process; {here} of the {DIST.size} processes share this machine's memory, "
                   f"the smallest of the processes' choices {chosen}; rank 0: {why}")
        log(f"batch_size auto: {batch_size} ({why})")
    else:
        batch_size = int(cfg["batch_size"])
    if batch_size * DIST.size > len(train_set):
        if DIST.size == 1:
            log(f"note: batch_size {batch_size} is more than the {len(train_set)} training examples; "
                f"using {len(train_set)}")
        else:
            log(f"note: batch_size {batch_size} x {DIST.size} processes is more than the "
                f"{len(train_set)} training examples; using {max(1, len(train_set) // DIST.size)} "
                "per process")
        batch_size = max(1, len(train_set) // DIST.size)
    global_batch_size = batch_size * DIST.size
    train_batches = batches.make_batches(train_set, global_batch_size)
    accum = cfg["grad_accumulation_steps"]

    # ---- 5. optimizer; the state of a resumed run ----------------------------------------
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    adapter_config = dict(cfg, batch_size=batch_size,
                          **{k: lora_info[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")})
    state = {
        "step": 0, "done": False, "stop_reason": None, "batch_size": batch_size,
        "best": None, "patience_ref": None, "patience_counter": 0, "val_history": [],
        "final_val_loss": None, "report": {"loss_sum": 0.0, "steps": 0},
        "tokens_seen": 0, "trained_tokens": 0, "elapsed_s": 0.0,
    }
    order = batches.BatchOrder(len(train_batches), cfg["seed"])
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if warm_weights is not None:
        if set(warm_weights) != expected:
            raise Stop(f"error: {args.resume}/{checkpoint.ADAPTERS} does not fit this model and "
                       "method (different fine_tune_type, num_layers or lora_parameters?)", EXIT_CONFIG)
        model.load_weights(list(warm_weights.items()), strict=False)
        log(f"starting from the weights in {args.resume} (step 0, new optimizer state)")
    if start is not None:
        saved = start.state
        weights = start.adapter_weights()
        if set(weights) != expected:
            raise Stop(f"error: {start.path} holds different weights than this model and method "
                       f"create ({len(set(weights) ^ expected)} names differ; changed "
                       "fine_tune_type, num_layers or lora_parameters?)", EXIT_CONFIG)
        model.load_weights(list(weights.items()), strict=False)
        opt_flat = start.optimizer_state()
        if set(opt_flat) == {k for k, _ in tree_flatten(optimizer.state)}:
            set_tree_leaves(optimizer.state, opt_flat)
        else:
            log(f"warning: the optimizer state in {start.path.name} does not fit this optimizer; "
                "starting it afresh")
        for key in state:
            if key in saved:
                state[key] = saved[key]
        state["batch_size"] = batch_size
        restored = batches.BatchOrder.restore(saved.get("data_position"), len(train_batches), cfg["seed"])
        if restored is None:
            log("note: the batches differ from the checkpoint's; starting a new epoch")
        else:
            order = restored
        rng = saved.get("rng") or {}
        if rng.get("numpy"):
            np.random.set_state(tuple(rng["numpy"]))
        if rng.get("python"):
            random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        if main_rank and start.path.parent.resolve() == ckpt_root.resolve():
            keep_metrics_until(paths.metrics_file(name), start.step)
        if main_rank:
            restore_best(state["best"], start.path.parent, paths.best_dir(name))
        log(f"resuming from {start.path} (step {start.step}/{cfg['iters']}, epoch {order.epoch}, "
            f"batch {order.index}/{order.n_batches})")
        if start.step >= cfg["iters"] or (saved.get("done") and not args.resume):
            log(f"this run is already complete ({saved.get('stop_reason')}); writing its outputs")
            if not main_rank:
                return 0
            meta = bundle.write(run_dir, start.path, cfg=adapter_config, state=state, tokenizer=tokenizer,
                                system_prompt=system_prompt, data_info=current["data"], base_hash=base_hash,
                                base_hash_method=base_hash_method, lora_info=lora_info,
                                metrics_path=paths.metrics_file(name), name=name)
            summarize(name, run_dir, meta)
            return 0
        state["done"], state["stop_reason"] = False, None

    # ---- 6. the loop -------------------------------------------------------------------
    metrics = Metrics(paths.metrics_file(name)) if main_rank else NoMetrics()
    iters = cfg["iters"]
    if DIST.size > 1:
        # Every process starts from rank 0's weights (the same seed gives the same adapters,
        # but a machine with another mlx would not): sum rank 0's with zeros from the others.
        own = dict(tree_flatten(model.trainable_parameters()))
        sent = own if main_rank else {k: mx.zeros_like(v) for k, v in own.items()}
        model.load_weights(list(tree_flatten(DIST.sum_tree(tree_unflatten(list(sent.items()))))),
                           strict=False)
        sum_loss_and_grad = nn.value_and_grad(model, sum_loss)
    per_process = f" per process x {DIST.size} processes = {global_batch_size}" if DIST.size > 1 else ""
    log(f"{len(train_set)} training / {len(valid_set)} validation examples, batch size {batch_size}"
        f"{per_process}{f' x {accum} accumulated' if accum > 1 else ''}, {len(train_batches)} batches per epoch, "
        f"{iters} steps, learning rate {cfg['learning_rate']:g} ({(cfg['lr_schedule'] or {}).get('name') or 'constant'})")
    log(f"checkpoints every {cfg['save_every']} steps in {ckpt_root}; metrics in {paths.metrics_file(name)}")

    stop_requested = []

    def on_signal(signum, frame):
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)
        log("stopping after this step (checkpoint first); press Ctrl-C again to stop at once")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def validate(step):
        loss, _ = batches.evaluate_loss(model, valid_set, global_batch_size, cfg["val_batches"],
                                        rank=DIST.rank, size=DIST.size, all_sum=DIST.all_sum_floats)
        if inject == ("val", step):
            loss = math.nan
        return loss

    def save(step, new_best=False):
        snapshot = dict(state, step=step, data_position=order.state(), fingerprint=current,
                        rng={"seed": cfg["seed"], "scheme": "mx.random.seed(step_seed(seed, step)) per step",
                             "mlx_key": np.array(mx.random.state[0]).tolist(),
                             "numpy": _np_state(), "python": _py_state()},
                        schedule={"optimizer_step": int(optimizer.state["step"].item()),
                                  "learning_rate": float(optimizer.learning_rate.item())})
        weights = dict(tree_flatten(model.trainable_parameters()))
        try:
            path = checkpoint.save(ckpt_root, step, weights, adapter_config,
                                   dict(tree_flatten(optimizer.state)), snapshot)
            if new_best:
                checkpoint.write_adapter_dir(path, paths.best_dir(name), {"best.json": state["best"]})
        except (OSError, RuntimeError) as e:   # a full disk, a read-only folder (mlx's writer
            last = checkpoint.list_steps(ckpt_root)   # raises RuntimeError): the previous one stays
            free = shutil.disk_usage(ckpt_root).free if ckpt_root.exists() else None
            detail = (f"{e.strerror}{f' ({e.filename})' if e.filename else ''}"
                      if isinstance(e, OSError) and e.strerror else str(e))
            raise Stop(
                f"error: cannot write the checkpoint of step {step} in {ckpt_root}: {detail}"
                f"{f' ({free / 2**20:.0f} MiB free)' if free is not None else ''}. Nothing is lost: "
                f"the last complete checkpoint is {last[-1][1].name if last else 'none'}. Free "
                "disk space (or make the folder writable) and run the same command to continue "
                "from it.", EXIT_IO) from None
        keep = {state["best"]["step"]} if state["best"] else set()
        checkpoint.prune(ckpt_root, cfg["keep_last"], keep)
        return path

    def fail(step, what, value):
        best = state["best"]
        last = checkpoint.list_steps(ckpt_root)
        raise Stop(
            f"error: {what} is {value} at step {step} (learning rate "
            f"{float(optimizer.learning_rate.item()):.3g}); training stopped. Nothing from this step "
            f"was saved: the last checkpoint is {last[-1][1].name if last else 'none'}"
            + (f", best/ holds step {best['step']} (validation loss {best['val_loss']:.4f})" if best else "")
            + ". Lower the learning rate (LEARNING_RATE=...) or lora_parameters.scale, check the "
            "data, and start over with FRESH=1.",
            EXIT_NAN)

    session_start = time.perf_counter()
    elapsed_before = state["elapsed_s"]
    steps_this_session = 0
    window = {"time": time.perf_counter(), "tokens": 0}
    model.train()
    step = state["step"]
    if step == 0 and valid_set:
        val = validate(0)
        if not math.isfinite(val):
            fail(0, "the validation loss", val)
        state["val_history"].append([0, val])
        metrics.write({"step": 0, "train_loss": None, "val_loss": val,
                       "lr": float(optimizer.learning_rate.item()), "tokens_per_s": None,
                       "peak_mem_gb": mx.get_peak_memory() / 1e9, "elapsed_s": 0.0, "tokens_seen": 0})
        log(f"step {0:>{len(str(iters))}}/{iters} | val {val:.4f} (before training)")

    while step < iters:
        step += 1
        if DIST.size == 1:
            mx.random.seed(step_seed(cfg["seed"], step))
            grads, loss_tok, n_targets = None, mx.array(0.0), mx.array(0)
            for _ in range(accum):
                batch, lengths, n_tokens = batches.collate(train_set, train_batches[order.next()])
                (loss, ntoks), g = loss_and_grad(model, batch, lengths)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_tok, n_targets = loss_tok + loss * ntoks, n_targets + ntoks
                mx.eval(grads, loss_tok, n_targets)
                state["tokens_seen"] += n_tokens
                window["tokens"] += n_tokens
            if accum > 1:
                grads = tree_map(lambda x: x / accum, grads)
            grad_sq = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
            loss = loss_tok / n_targets
            mx.eval(loss, grad_sq)
            loss_value, grad_norm = loss.item(), math.sqrt(grad_sq.item())
        else:
            # This process's share of each global batch; its loss sum is divided by the
            # target count of the whole batch (known here: every process has all examples),
            # so the sum of the processes' gradients is the gradient of the global mean.
            mx.random.seed(rank_step_seed(cfg["seed"], step, DIST.rank))
            grads, loss_sum, count = None, mx.array(0.0), 0
            for _ in range(accum):
                indices = train_batches[order.next()]
                mine = batches.shard(indices, DIST.rank, DIST.size)
                n = batches.target_count(train_set, indices)
                if mine:
                    batch, lengths, _ = batches.collate(train_set, mine)
                    (_, local_sum), g = sum_loss_and_grad(model, batch, lengths, float(n))
                else:                                   # a last batch smaller than the ranks
                    g, local_sum = tree_map(mx.zeros_like, model.trainable_parameters()), mx.array(0.0)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                loss_sum, count = loss_sum + local_sum, count + n
                mx.eval(grads, loss_sum)
                n_tokens = batches.token_count(train_set, indices)
                state["tokens_seen"] += n_tokens
                window["tokens"] += n_tokens
            if accum > 1:
                grads = tree_map(lambda x: x / accum, grads)
            grads = DIST.sum_tree(grads)
            total, stops = DIST.all_sum_floats([loss_sum.item(), float(bool(stop_requested))])
            grad_sq = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
            n_targets = mx.array(count)
            loss_value, grad_norm = total / count, math.sqrt(grad_sq.item())
        if inject == ("train", step):
            loss_value = math.nan
        if not math.isfinite(loss_value):
            fail(step, "the training loss", loss_value)
        if not math.isfinite(grad_norm):
            fail(step, "the gradient norm", grad_norm)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state)
        del grads
        state["trained_tokens"] += int(n_targets.item())
        state["report"]["loss_sum"] += loss_value
        state["report"]["steps"] += 1
        steps_this_session += 1
        if step_delay:
            time.sleep(step_delay)
        if cfg["clear_cache_threshold"] and mx.get_cache_memory() > cfg["clear_cache_threshold"]:
            mx.clear_cache()

        # report, evaluate, keep the best, stop early, checkpoint
        lr = float(optimizer.learning_rate.item())
        elapsed = elapsed_before + time.perf_counter() - session_start
        record = None
        if step % cfg["steps_per_report"] == 0 or step == iters:
            now = time.perf_counter()
            tps = window["tokens"] / max(now - window["time"], 1e-9)
            train_loss = state["report"]["loss_sum"] / state["report"]["steps"]
            state["report"] = {"loss_sum": 0.0, "steps": 0}
            window = {"time": now, "tokens": 0}
            eta = (time.perf_counter() - session_start) / steps_this_session * (iters - step)
            record = {"step": step, "train_loss": train_loss, "val_loss": None, "lr": lr,
                      "tokens_per_s": tps, "peak_mem_gb": mx.get_peak_memory() / 1e9,
                      "elapsed_s": elapsed, "tokens_seen": state["tokens_seen"]}
            log(f"step {step:>{len(str(iters))}}/{iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
                f"{tps:,.0f} tok/s | peak {mx.get_peak_memory() / 1e9:.2f} GB | "
                f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}")
        new_best = False
        if valid_set and (step % cfg["steps_per_eval"] == 0 or step == iters):
            val = validate(step)
            if not math.isfinite(val):
                fail(step, "the validation loss", val)
            state["val_history"].append([step, val])
            state["final_val_loss"] = val
            if state["best"] is None or val < state["best"]["val_loss"]:
                state["best"] = {"step": step, "val_loss": val}
                new_best = True
            if state["patience_ref"] is None or val < state["patience_ref"] - cfg["min_delta"]:
                state["patience_ref"], state["patience_counter"] = val, 0
            else:
                state["patience_counter"] += 1
            if record is None:
                record = {"step": step, "train_loss": None, "val_loss": val, "lr": lr,
                          "tokens_per_s": None, "peak_mem_gb": mx.get_peak_memory() / 1e9,
                          "elapsed_s": elapsed, "tokens_seen": state["tokens_seen"]}
            record["val_loss"] = val
            best = state["best"]
            log(f"step {step:>{len(str(iters))}}/{iters} | val {val:.4f} | best {best['val_loss']:.4f} "
                f"(step {best['step']})"
                + (f" | {state['patience_counter']}/{cfg['patience']} without improvement"
                   if cfg["patience"] else ""))
            if cfg["patience"] and state["patience_counter"] >= cfg["patience"]:
                state["done"], state["stop_reason"] = True, "early_stopping"
                log(f"early stopping at step {step}: no improvement of more than {cfg['min_delta']:g} "
                    f"for {cfg['patience']} evaluations")
        if record is not None:
            metrics.write(record)
        if step == iters:
            state["done"], state["stop_reason"] = True, state["stop_reason"] or "completed"
        state["step"] = step
        state["elapsed_s"] = elapsed_before + time.perf_counter() - session_start
        # Ctrl-C / SIGTERM: on its own, as soon as it came; in a distributed run, when any
        # process had one at this step's all_sum, so that they all stop at the same step.
        stopping = bool(stop_requested) if DIST.size == 1 else stops > 0
        if main_rank and (step % cfg["save_every"] == 0 or new_best or state["done"] or stopping):
            save(step, new_best)
        if state["done"]:
            break
        if stopping:
            raise Stop(f"interrupted at step {step}; checkpoint saved. Run the same command to "
                       "continue.", EXIT_INTERRUPTED)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    # ---- 7. the bundle -----------------------------------------------------------------
    if not main_rank:
        return 0
    if not valid_set:
        final = checkpoint.list_steps(ckpt_root)[-1][1]
        checkpoint.write_adapter_dir(final, paths.best_dir(name), {"best.json": {"step": step, "val_loss": None}})
    final_path = checkpoint.list_steps(ckpt_root)[-1][1]
    meta = bundle.write(run_dir, final_path, cfg=adapter_config, state=state, tokenizer=tokenizer,
                        system_prompt=system_prompt, data_info=current["data"], base_hash=base_hash,
                        base_hash_method=base_hash_method, lora_info=lora_info,
                        metrics_path=paths.metrics_file(name), name=name)
    summarize(name, run_dir, meta)
    return 0


def _np_state():
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _py_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def summarize(name, run_dir, meta):
    best, final = meta.get("best_val_loss"), meta.get("final_val_loss")
    log(f"done: {run_dir} - {meta['steps']} steps in {fmt_time(meta['wall_time_s'])}, "
        f"validation loss best {best if best is None else f'{best:.4f}'} (step {meta['best_step']}), "
        f"final {final if final is None else f'{final:.4f}'}")
    log(f"next: make eval NAME={name} | make worker NAME={name} | see {run_dir / 'INTEGRATION_GUIDE.md'}")


if __name__ == "__main__":
    sys.exit(main())
