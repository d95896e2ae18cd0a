"""Fine-tune a base model on the prepared chat data: LoRA by default, DoRA or full weights.

    python -m train.train --config train/config.yaml --name farense [--model M] [--data D]
        [--iters N] [--batch-size N|auto] [--learning-rate X] [--save-every N]
        [--eval-every N] [--seed N] [--patience N] [--lora-rank N] [--lora-layers N]
        [--set key=value ...] [--fresh] [--resume PATH] [--keep best|last]
        [--models-dir DIR] [--logs-dir DIR]

(`make train` builds this command from its variables.) The config's keys are mlx_lm.lora's;
the options above and --set override them. With a quantized base (e.g. 4-bit) LoRA is QLoRA.

The run, top to bottom (run()): load the base and the data, add adapters (load_inputs) ->
find where to start: the newest intact checkpoint, --resume PATH, or step 0 (find_start) ->
pick the batch size (choose_batch_size) -> restore (Trainer.restore) -> fit: for each step
seed the RNG from (seed, step), take the next batches of the epoch's fixed order,
forward/backward, stop on a non-finite loss, update (Trainer.train_step); report, evaluate,
keep the best and count patience (report, validate_and_track, RunState.record_val),
checkpoint (save) -> write the bundle (write_outputs, bundle.py). Everything a step depends
on is a function of the checkpoint, so an interrupted run (Ctrl-C, kill -9, power loss)
rerun with the same command ends where an uninterrupted one ends.

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

Outputs (paths.Layout): models/NAME/ (the shipped adapter: best/'s, or last/'s with KEEP=last;
best/, last/, checkpoints/, metadata.json, ...), logs/NAME/metrics.jsonl.
Exit codes: 0 done; 2 bad configuration or refused resume; 3 non-finite loss; 4 another
process of a distributed run stopped or crashed (or its launcher is gone); 5 a checkpoint
could not be written (disk full, read-only folder); 130 interrupted.
Test hooks (environment): TRAIN_INJECT_NAN=train:STEP|val:STEP, TRAIN_STEP_DELAY_S=seconds.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core import atomic, memory, schedules
from core.config import ConfigError, check_config, from_args
from core.paths import CONFIG, Layout, step_name
from train import batches, bundle, checkpoint
from train.dist import Dist, PeerLost
from train.state import (
    RunState,
    describe_changes,
    fingerprint,
    fingerprint_id,
    host_rng_state,
    set_host_rng_state,
    step_seed,
)

EXIT_CONFIG, EXIT_NAN, EXIT_PEER, EXIT_IO, EXIT_INTERRUPTED = 2, 3, 4, 5, 130
# Command-line options -> config keys.
OPTION_KEYS = {
    "model": "model",
    "data": "data",
    "iters": "iters",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "save_every": "save_every",
    "eval_every": "steps_per_eval",
    "seed": "seed",
    "patience": "patience",
    "lora_rank": "lora_parameters.rank",
    "lora_layers": "num_layers",
    "keep": "keep",
}
DIST = Dist()  # this process's place in the run (main() joins mlx.launch's group)


class Stop(Exception):
    """Ends the run with a message and an exit code."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def log(message, every_rank=False):
    DIST.log(message, every_rank)


# --------------------------------------------------------------------------- the run


def run(args):
    """Load the inputs, find where to start, choose the batch size, restore, fit, write the
    outputs. Every process runs this; rank 0 writes."""
    cfg = resolve_config(args)
    layout = Layout.for_run(args.name, args.models_dir, args.logs_dir)
    inputs = load_inputs(cfg)
    start = find_start(args, layout, inputs)
    batch_size = choose_batch_size(cfg, inputs, start)
    trainer = Trainer(cfg, layout, inputs, batch_size)
    trainer.restore(start)
    if already_complete(start, trainer.state, cfg, args.resume):
        log(f"this run is already complete ({trainer.state.stop_reason}); writing its outputs")
        final = start.saved.path
    else:
        trainer.state.done, trainer.state.stop_reason = False, None
        final = trainer.fit()
    if DIST.main:
        write_outputs(layout, final, trainer)
    return 0


# --------------------------------------------------------------------------- configuration


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG), help="YAML config (default train/config.yaml)")
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted for nested ones (lr_schedule.warmup=100); repeatable",
    )
    p.add_argument(
        "--fresh", action="store_true", help="start over, deleting this run's checkpoints and outputs"
    )
    p.add_argument(
        "--resume", metavar="PATH", help="continue from this checkpoint folder (even if the config changed)"
    )
    p.add_argument("--models-dir", help="where run folders go (default models/, or $MODELS_DIR)")
    p.add_argument("--logs-dir", help="where logs go (default logs/, or $LOGS_DIR)")
    p.add_argument(
        "--keep",
        choices=("best", "last"),
        help="the adapter the bundle ships: best (lowest validation loss, default) or last",
    )
    return p.parse_args(argv)


def resolve_config(args):
    """defaults <- --config <- options and --set; checked (config.py)."""
    cfg = from_args(args, OPTION_KEYS)
    for note in check_config(cfg):
        log(note)
    return cfg


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What a run trains on: the model with its adapters, and the encoded data."""

    model: object
    tokenizer: object
    base: dict  # name, hash, hash_method, revision
    train_split: batches.Split
    valid_split: batches.Split
    train_set: list
    valid_set: list
    system_prompt: str | None
    lora_info: dict
    fingerprint: dict = field(default_factory=dict)


def load_inputs(cfg):
    """The base model (with adapters added) and the data, encoded."""
    model, tokenizer, model_config = load_base(cfg)
    base = bundle.base_model_identity(cfg["model"])
    train_split, valid_split, system_prompt = read_data(cfg)
    train_set, valid_set = (
        encode_split(tokenizer, s, system_prompt, cfg) for s in (train_split, valid_split)
    )
    if not train_set:
        raise Stop("error: no usable training example (all longer than max_seq_length?)", EXIT_CONFIG)
    if not valid_set:
        log("warning: no validation data; no validation loss, best/ or early stopping")
    seed_all(cfg["seed"])
    lora_info = add_adapters(model, cfg)
    lora_info["base_quantized"] = bool(model_config.get("quantization"))
    if lora_info["base_quantized"] and cfg["fine_tune_type"] == "full":
        log("warning: full fine-tuning of a quantized base trains only its non-quantized weights")
    method = (
        "QLoRA" if lora_info["base_quantized"] and cfg["fine_tune_type"] == "lora" else cfg["fine_tune_type"]
    )
    log(
        f"{method}: {lora_info['trainable_parameters']:,} trainable of "
        f"{lora_info['total_parameters']:,} parameters ({len(lora_info['adapted_modules'])} modules)"
    )
    current = fingerprint(cfg, train_split.info, valid_split.info, base["hash"], DIST.size)
    return Inputs(
        model,
        tokenizer,
        base,
        train_split,
        valid_split,
        train_set,
        valid_set,
        system_prompt,
        lora_info,
        current,
    )


def load_base(cfg):
    from mlx_lm import load

    log(f"loading {cfg['model']}")
    trust = cfg["trust_remote_code"]
    try:
        return load(
            cfg["model"],
            return_config=True,
            tokenizer_config={"trust_remote_code": trust},
            trust_remote_code=trust,
        )
    except Exception as e:
        raise Stop(
            f"error: cannot load the base model {cfg['model']!r}: {type(e).__name__}: {e}", EXIT_CONFIG
        ) from None


def read_data(cfg):
    """(train split, valid split, the system prompt training adds)."""
    data_dir = Path(cfg["data"])
    train_split = batches.read_split(data_dir / "train.jsonl")
    valid_split = batches.read_split(data_dir / "valid.jsonl")
    if not train_split.conversations:
        raise Stop(f"error: no training data in {data_dir / 'train.jsonl'} (run `make data`)", EXIT_CONFIG)
    data_system = batches.common_system_prompt(train_split.conversations)
    if cfg["system_prompt"] is None:
        return train_split, valid_split, data_system
    if data_system is not None and data_system != cfg["system_prompt"]:
        log(
            "warning: the training conversations carry a different system prompt than the config's; "
            "the worker will add the config's to conversations without one"
        )
    return train_split, valid_split, cfg["system_prompt"]


def encode_split(tokenizer, split, system_prompt, cfg):
    """[(ids, loss offset)] of one split (cfg["train_on"]: the turns trained, for batches)."""
    try:
        enc = batches.encode(
            tokenizer,
            split.conversations,
            system_prompt,
            cfg["mask_prompt"],
            cfg["max_seq_length"],
            cfg["train_on"],
            split.where,
        )
    except ValueError as e:  # file:line: what the chat template cannot encode
        raise Stop(f"error: {e}", EXIT_CONFIG) from None
    if enc.truncated or enc.dropped:
        log(
            f"{split.path}: {enc.truncated} conversation(s) cut to max_seq_length "
            f"{cfg['max_seq_length']}, {enc.dropped} dropped (no answer token left)"
        )
    return enc.examples


def seed_all(seed):
    import mlx.core as mx

    mx.random.seed(seed)
    np.random.seed(seed)
    random.seed(seed)


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
        for layer in model.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(
            model, num_layers, dict(cfg["lora_parameters"]), use_dora=cfg["fine_tune_type"] == "dora"
        )
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


def make_optimizer(cfg):
    import mlx.optimizers as optim

    name = str(cfg["optimizer"]).lower()
    cls = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "sgd": optim.SGD,
        "adafactor": optim.Adafactor,
        "muon": optim.Muon,
    }[name]
    return cls(learning_rate=schedules.build(cfg), **(cfg["optimizer_config"].get(name) or {}))


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


# --------------------------------------------------------------------------- where to start


@dataclass
class Start:
    """A checkpoint to resume, or an adapter's weights to start from (--resume), or neither."""

    saved: checkpoint.Checkpoint | None = None
    warm_weights: dict | None = None
    warm_path: Path | None = None


def find_start(args, layout, inputs):
    """The newest intact checkpoint, --resume PATH, or step 0; rank 0 tidies the run folder."""
    if args.resume:
        start = start_from_path(Path(args.resume), inputs.fingerprint)
    elif args.fresh:
        start = Start()
    else:
        start = start_from_run(layout, inputs.fingerprint)
    if DIST.size > 1:
        agree_on_start(inputs.fingerprint, start, layout.run)
    if DIST.main:
        tidy_run_folder(layout, start, args.fresh)
    return start


def start_from_path(path, current):
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


def start_from_run(layout, current):
    """The newest intact checkpoint of this run, refused when the setup changed."""
    if DIST.main:
        checkpoint.clean_temp(layout.checkpoints)
    start = checkpoint.latest_valid(layout.checkpoints, log=lambda m: log(f"warning: {m}"))
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
        log(f"no usable checkpoint in {layout.checkpoints}; starting over")
    return Start(saved=start)


def already_complete(start, state, cfg, resume):
    """A finished run rerun (not with --resume): nothing to train, its outputs are rewritten."""
    return start.saved is not None and (start.saved.step >= cfg["iters"] or (state.done and not resume))


def tidy_run_folder(layout, start, fresh):
    """Starting over: the old outputs go. Resuming: checkpoints newer than the start go. And
    the temporary files of interrupted writes."""
    ckpt = start.saved
    if ckpt is None:
        if fresh or layout.metadata.exists() or layout.checkpoints.exists():
            log(f"starting over in {layout.run}")
        wipe_run(layout)
    elif ckpt.path.parent.resolve() != layout.checkpoints.resolve():  # another run's checkpoint
        wipe_run(layout)
    else:
        for removed in checkpoint.remove_newer(layout.checkpoints, ckpt.step):
            log(f"removed checkpoint {step_name(removed)} (newer than the one resumed)")
    for p in layout.run.iterdir() if layout.run.is_dir() else []:
        if p.name.startswith(atomic.STAGED_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)  # atomic.write_bytes' half-written file


def agree_on_start(current, start, run_dir):
    """All processes must start from the same setup and the same checkpoint (or none); a
    process on another machine that sees another run folder would train something else."""
    if start.saved is not None:
        manifest = json.loads((start.saved.path / checkpoint.MANIFEST).read_text(encoding="utf-8"))
        sha = manifest["files"][checkpoint.ADAPTERS]["sha256"]
        mine = [fingerprint_id(current), start.saved.step, int(sha[:12], 16)]
    else:
        mine = [fingerprint_id(current), -2 if start.warm_weights is not None else -1, 0]
    views = DIST.all_gather_ints(mine)
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


def wipe_run(layout):
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


# --------------------------------------------------------------------------- the batch size


def choose_batch_size(cfg, inputs, start):
    """Per process: the config's, the one a resumed run chose, or probed (auto); at most
    what the training set allows."""
    n_train = len(inputs.train_set)
    memory.set_wired_limit(log)  # as mlx-lm's trainer (Metal only)
    saved = start.saved.state.get("batch_size") if start.saved is not None else None
    if cfg["batch_size"] == "auto" and saved:
        batch_size = int(saved)
        log(f"batch_size auto: {batch_size} (as chosen when this run started)")
        try:
            memory.check_resumed_batch_size(
                inputs.model, cfg, batch_size, inputs.train_set, cfg["auto_batch"]["memory_fraction"], log=log
            )
        except memory.DoesNotFit as e:
            raise Stop(str(e), EXIT_CONFIG) from None
    elif cfg["batch_size"] == "auto":
        batch_size = probe_batch_size(cfg, inputs)
    else:
        batch_size = int(cfg["batch_size"])
        memory.check_fixed_batch_size(
            inputs.model, cfg, batch_size, inputs.train_set, cfg["auto_batch"]["memory_fraction"], log=log
        )
    if batch_size * DIST.size > n_train:
        if DIST.size == 1:
            log(
                f"note: batch_size {batch_size} is more than the {n_train} training examples; using {n_train}"
            )
        else:
            log(
                f"note: batch_size {batch_size} x {DIST.size} processes is more than the "
                f"{n_train} training examples; using {max(1, n_train // DIST.size)} per process"
            )
        batch_size = max(1, n_train // DIST.size)
    return batch_size


def probe_batch_size(cfg, inputs):
    """The largest batch that fits memory. Every process probes at once; those on one machine
    share its memory. The run takes the smallest choice, so it fits everywhere."""
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss

    model = inputs.model
    extra = memory.optimizer_state_bytes(model, str(cfg["optimizer"]).lower())
    max_batch_size = cfg["auto_batch"]["max_batch_size"]
    memory_fraction = cfg["auto_batch"]["memory_fraction"]
    if DIST.size > 1:
        hosts = [h for (h,) in DIST.all_gather_ints([DIST.host_id()])]
        here = hosts.count(DIST.host_id())
        memory_fraction /= here
        max_batch_size = max(1, min(max_batch_size, len(inputs.train_set) // DIST.size))
    try:
        batch_size, why = memory.auto_batch_size(
            model,
            nn.value_and_grad(model, default_loss),
            inputs.train_set,
            batches.collate,
            cfg,
            max_batch_size=max_batch_size,
            memory_fraction=memory_fraction,
            extra_bytes=extra,
            log=log,
        )
    except memory.DoesNotFit as e:
        raise Stop(str(e), EXIT_CONFIG) from None
    if DIST.size > 1:
        chosen = [b for (b,) in DIST.all_gather_ints([batch_size])]
        batch_size = min(chosen)
        why = (
            f"per process; {here} of the {DIST.size} processes share this machine's memory, "
            f"the smallest of the processes' choices {chosen}; rank 0: {why}"
        )
    log(f"batch_size auto: {batch_size} ({why})")
    return batch_size


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """The optimizer, the run state and the data position of one run, and the loop over
    steps: train_step, report, validate_and_track, save (as mlx-lm's tuner.trainer.train)."""

    def __init__(self, cfg, layout, inputs, batch_size):
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        self.cfg, self.layout, self.inputs, self.model = cfg, layout, inputs, inputs.model
        self.global_batch_size = batch_size * DIST.size
        self.train_batches = batches.make_batches(inputs.train_set, self.global_batch_size)
        self.accum = cfg["grad_accumulation_steps"]
        self.loss_and_grad = nn.value_and_grad(self.model, sum_loss)
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.adapter_config = dict(
            cfg,
            batch_size=batch_size,
            **{k: inputs.lora_info[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")},
        )
        self.state = RunState(batch_size=batch_size)
        self.order = batches.BatchOrder(len(self.train_batches), cfg["seed"])
        self.weight_names = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        self.stop_requested = []
        inject = os.environ.get("TRAIN_INJECT_NAN", "")  # test hook: "train:12" / "val:20"
        self.inject = (inject.split(":")[0], int(inject.split(":")[1])) if ":" in inject else None
        self.step_delay = float(os.environ.get("TRAIN_STEP_DELAY_S") or 0)  # test hook

    # ---- restore -------------------------------------------------------------------------

    def restore(self, start):
        """Continue from a checkpoint (weights, optimizer, state, data position, RNGs) or
        start from an adapter's weights (--resume of a plain adapter folder), if any."""
        if start.saved is None and start.warm_weights is None:
            return
        if start.warm_weights is not None:
            if set(start.warm_weights) != self.weight_names:
                raise Stop(
                    f"error: {start.warm_path}/{checkpoint.ADAPTERS} does not fit this model and "
                    "method (different fine_tune_type, num_layers or lora_parameters?)",
                    EXIT_CONFIG,
                )
            self.model.load_weights(list(start.warm_weights.items()), strict=False)
            log(f"starting from the weights in {start.warm_path} (step 0, new optimizer state)")
            return
        ckpt = start.saved
        self._load_weights_and_optimizer(ckpt)
        saved = ckpt.state
        self.state = RunState.restore(saved, batch_size=self.state.batch_size)
        order = batches.BatchOrder.restore(
            saved.get("data_position"), len(self.train_batches), self.cfg["seed"]
        )
        if order is None:
            log("note: the batches differ from the checkpoint's; starting a new epoch")
        self.order = order or self.order
        set_host_rng_state(saved.get("rng") or {})
        if DIST.main:
            if ckpt.path.parent.resolve() == self.layout.checkpoints.resolve():
                keep_metrics_until(self.layout.metrics, ckpt.step)
            restore_best(self.state.best, ckpt.path.parent, self.layout.best)
        log(
            f"resuming from {ckpt.path} (step {ckpt.step}/{self.cfg['iters']}, epoch {self.order.epoch}, "
            f"batch {self.order.index}/{self.order.n_batches})"
        )

    def _load_weights_and_optimizer(self, ckpt):
        from mlx.utils import tree_flatten

        weights = ckpt.adapter_weights()
        if set(weights) != self.weight_names:
            raise Stop(
                f"error: {ckpt.path} holds different weights than this model and method "
                f"create ({len(set(weights) ^ self.weight_names)} names differ; changed "
                "fine_tune_type, num_layers or lora_parameters?)",
                EXIT_CONFIG,
            )
        self.model.load_weights(list(weights.items()), strict=False)
        opt_flat = ckpt.optimizer_state()
        if set(opt_flat) == {k for k, _ in tree_flatten(self.optimizer.state)}:
            set_tree_leaves(self.optimizer.state, opt_flat)
        else:
            log(
                f"warning: the optimizer state in {ckpt.path.name} does not fit this optimizer; "
                "starting it afresh"
            )

    # ---- the loop ------------------------------------------------------------------------

    def fit(self):
        """Train to cfg.iters (or early stopping); returns the final checkpoint's folder."""
        self._begin()
        iters = self.cfg["iters"]
        while self.state.step < iters:
            step = self.state.step + 1
            stop_votes = self.train_step(step)
            lr, elapsed = self.learning_rate(), self.elapsed()
            reported = self.report(step, lr, elapsed)
            val_loss, new_best = self.validate_and_track(step)
            if reported or val_loss is not None:
                self.metrics.write(self.record(step, lr, elapsed, val_loss=val_loss, **(reported or {})))
            if step == iters:
                self.state.done, self.state.stop_reason = True, self.state.stop_reason or "completed"
            self.state.step, self.state.elapsed_s = step, self.elapsed()
            # Ctrl-C / SIGTERM: on its own, as soon as it came; in a distributed run, when any
            # process had one at this step's all_sum, so that they all stop at the same step.
            stopping = bool(self.stop_requested) if DIST.size == 1 else stop_votes > 0
            if DIST.main and (step % self.cfg["save_every"] == 0 or new_best or self.state.done or stopping):
                self.save(step, new_best)
            if self.state.done:
                break
            if stopping:
                raise Stop(
                    f"interrupted at step {step}; checkpoint saved. Run the same command to continue.",
                    EXIT_INTERRUPTED,
                )
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return checkpoint.list_steps(self.layout.checkpoints)[-1][1] if DIST.main else None

    def _begin(self):
        """Same weights everywhere, the plan on stderr, signal handlers, the loss at step 0."""
        if DIST.size > 1:
            self._take_rank0_weights()
        cfg, accum, inputs = self.cfg, self.accum, self.inputs
        per_process = (
            f" per process x {DIST.size} processes = {self.global_batch_size}" if DIST.size > 1 else ""
        )
        log(
            f"{len(inputs.train_set)} training / {len(inputs.valid_set)} validation examples, batch size "
            f"{self.state.batch_size}{per_process}{f' x {accum} accumulated' if accum > 1 else ''}, "
            f"{len(self.train_batches)} batches per epoch, {cfg['iters']} steps, learning rate "
            f"{cfg['learning_rate']:g} ({(cfg['lr_schedule'] or {}).get('name') or 'constant'})"
        )
        log(
            f"checkpoints every {cfg['save_every']} steps in {self.layout.checkpoints}; "
            f"metrics in {self.layout.metrics}"
        )
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # opened after restore(), which rewrites the file (keep_metrics_until)
        self.metrics = Metrics(self.layout.metrics) if DIST.main else NoMetrics()
        self.session_start = self.window_start = time.perf_counter()
        self.elapsed_before, self.steps_this_session, self.window_tokens = self.state.elapsed_s, 0, 0
        self.model.train()
        if self.state.step == 0 and inputs.valid_set:
            val, _ = self.validate_and_track(0)
            self.metrics.write(self.record(0, self.learning_rate(), 0.0, val_loss=val))

    def _take_rank0_weights(self):
        """Every process starts from rank 0's weights (the same seed gives the same adapters,
        but a machine with another mlx would not): sum rank 0's with zeros from the others."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_unflatten

        own = dict(tree_flatten(self.model.trainable_parameters()))
        sent = own if DIST.main else {k: mx.zeros_like(v) for k, v in own.items()}
        summed = DIST.sum_tree(tree_unflatten(list(sent.items())))
        self.model.load_weights(list(tree_flatten(summed)), strict=False)

    def _on_signal(self, signum, frame):
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested.append(signum)
        log("stopping after this step (checkpoint first); press Ctrl-C again to stop at once")

    # ---- one step ------------------------------------------------------------------------

    def gradients(self, step):
        """This process's share of the step's `accum` global batches: its loss sum divided by
        the target count of the whole batch (known here: every process has all examples), so
        the sum over the processes is the gradient of the global mean (one process: the
        gradient of the batch's mean). Returns (grads, loss, grad norm, targets, stop votes)."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map

        mx.random.seed(step_seed(self.cfg["seed"], step, DIST.rank))
        examples = self.inputs.train_set
        grads, loss_sum, count = None, mx.array(0.0), 0
        for _ in range(self.accum):
            indices = self.train_batches[self.order.next()]
            mine = batches.shard(indices, DIST.rank, DIST.size)
            n = batches.target_count(examples, indices)
            if mine:
                batch, lengths, _ = batches.collate(examples, mine)
                (_, local_sum), g = self.loss_and_grad(self.model, batch, lengths, float(n))
            else:  # a last batch smaller than the ranks
                g, local_sum = tree_map(mx.zeros_like, self.model.trainable_parameters()), mx.array(0.0)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss_sum, count = loss_sum + local_sum, count + n
            mx.eval(grads, loss_sum)
            n_tokens = batches.token_count(examples, indices)
            self.state.tokens_seen += n_tokens
            self.window_tokens += n_tokens
        if self.accum > 1:
            grads = tree_map(lambda x: x / self.accum, grads)
        grads = DIST.sum_tree(grads)
        total, stops = DIST.all_sum_floats([loss_sum.item(), float(bool(self.stop_requested))])
        grad_sq = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        return grads, total / count, math.sqrt(grad_sq.item()), count, stops

    def train_step(self, step):
        """Gradients, the finite checks, the update; returns the processes' stop votes."""
        import mlx.core as mx

        grads, loss, grad_norm, n_targets, stop_votes = self.gradients(step)
        if self.inject == ("train", step):
            loss = math.nan
        if not math.isfinite(loss):
            self.fail(step, "the training loss", loss)
        if not math.isfinite(grad_norm):
            self.fail(step, "the gradient norm", grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        del grads
        self.state.trained_tokens += int(n_targets)
        self.state.add_report(loss)
        self.steps_this_session += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.cfg["clear_cache_threshold"] and mx.get_cache_memory() > self.cfg["clear_cache_threshold"]:
            mx.clear_cache()
        return stop_votes

    # ---- report, validate, save ----------------------------------------------------------

    def report(self, step, lr, elapsed):
        """Every steps_per_report steps (and the last): the mean training loss since the last
        report and the throughput, on stderr; returns them for the metrics, else None."""
        import mlx.core as mx

        iters = self.cfg["iters"]
        if step % self.cfg["steps_per_report"] and step != iters:
            return None
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        train_loss = self.state.take_report()
        eta = (now - self.session_start) / self.steps_this_session * (iters - step)
        log(
            f"step {step:>{len(str(iters))}}/{iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
            f"{tps:,.0f} tok/s | peak {mx.get_peak_memory() / 1e9:.2f} GB | "
            f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}"
        )
        return {"train_loss": train_loss, "tokens_per_s": tps}

    def validate_and_track(self, step):
        """Every steps_per_eval steps (and the last, and step 0): the validation loss, the best
        one and patience (RunState.record_val). Returns (loss or None, whether a new best)."""
        iters = self.cfg["iters"]
        if not self.inputs.valid_set or (step % self.cfg["steps_per_eval"] and step != iters):
            return None, False
        val, _ = batches.evaluate_loss(
            self.model,
            self.inputs.valid_set,
            self.global_batch_size,
            self.cfg["val_batches"],
            rank=DIST.rank,
            size=DIST.size,
            all_sum=DIST.all_sum_floats,
        )
        if self.inject == ("val", step):
            val = math.nan
        if not math.isfinite(val):
            self.fail(step, "the validation loss", val)
        state, patience = self.state, self.cfg["patience"]
        new_best = state.record_val(step, val, self.cfg["min_delta"], patience)
        width = len(str(iters))
        if step == 0:
            log(f"step {0:>{width}}/{iters} | val {val:.4f} (before training)")
            return val, False
        log(
            f"step {step:>{width}}/{iters} | val {val:.4f} | best {state.best['val_loss']:.4f} "
            f"(step {state.best['step']})"
            + (f" | {state.patience_counter}/{patience} without improvement" if patience else "")
        )
        if state.stop_reason == "early_stopping":
            log(
                f"early stopping at step {step}: no improvement of more than "
                f"{self.cfg['min_delta']:g} for {patience} evaluations"
            )
        return val, new_best

    def save(self, step, new_best=False):
        """Checkpoint `step` (and best/ when it is the best); prune old checkpoints. A write
        that fails (a full disk, a read-only folder) stops the run; the previous one stays."""
        from mlx.utils import tree_flatten

        root = self.layout.checkpoints
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        try:
            path = checkpoint.save(
                root,
                step,
                weights,
                self.adapter_config,
                dict(tree_flatten(self.optimizer.state)),
                self.snapshot(step),
            )
            if new_best:
                checkpoint.write_adapter_dir(path, self.layout.best, {"best.json": self.state.best})
        except (OSError, RuntimeError) as e:  # mlx's writer raises RuntimeError on a full disk
            raise Stop(checkpoint_write_error(root, step, e), EXIT_IO) from None
        keep = {self.state.best["step"]} if self.state.best else set()
        checkpoint.prune(root, self.cfg["keep_last"], keep)
        return path

    def snapshot(self, step):
        """training_state.json: the run state, the data position, the RNGs, the schedule."""
        import mlx.core as mx

        return dict(
            self.state.snapshot(),
            step=step,
            data_position=self.order.state(),
            fingerprint=self.inputs.fingerprint,
            rng={
                "seed": self.cfg["seed"],
                "scheme": "mx.random.seed(step_seed(seed, step)) per step",
                "mlx_key": np.array(mx.random.state[0]).tolist(),
                **host_rng_state(),
            },
            schedule={
                "optimizer_step": int(self.optimizer.state["step"].item()),
                "learning_rate": self.learning_rate(),
            },
        )

    # ---- small parts -----------------------------------------------------------------------

    def learning_rate(self):
        return float(self.optimizer.learning_rate.item())

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.session_start

    def record(self, step, lr, elapsed, train_loss=None, val_loss=None, tokens_per_s=None):
        """One line of metrics.jsonl."""
        import mlx.core as mx

        return {
            "step": step,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "peak_mem_gb": mx.get_peak_memory() / 1e9,
            "elapsed_s": elapsed,
            "tokens_seen": self.state.tokens_seen,
        }

    def fail(self, step, what, value):
        best = self.state.best
        last = checkpoint.list_steps(self.layout.checkpoints)
        raise Stop(
            f"error: {what} is {value} at step {step} (learning rate {self.learning_rate():.3g}); "
            "training stopped. Nothing from this step was saved: the last checkpoint is "
            f"{last[-1][1].name if last else 'none'}"
            + (f", best/ holds step {best['step']} (validation loss {best['val_loss']:.4f})" if best else "")
            + ". Lower the learning rate (LEARNING_RATE=...) or lora_parameters.scale, check the "
            "data, and start over with FRESH=1.",
            EXIT_NAN,
        )


def checkpoint_write_error(root, step, e):
    """The message of a checkpoint that could not be written: the cause, the free space, and
    the last complete checkpoint (nothing is lost)."""
    last = checkpoint.list_steps(root)
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


# --------------------------------------------------------------------------- resume helpers


def restore_best(best, lineage_dir, best_dir):
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


# --------------------------------------------------------------------------- outputs


def write_outputs(layout, final, trainer):
    """The bundle (bundle.write) from the final checkpoint: last/ holds its adapter, the
    folder's adapters.safetensors the best one (cfg keep: best | last)."""
    inputs, state = trainer.inputs, trainer.state
    if not inputs.valid_set:  # no validation loss: the final adapter is the best we know
        checkpoint.write_adapter_dir(
            final, layout.best, {"best.json": {"step": state.step, "val_loss": None}}
        )
    meta = bundle.write(
        layout,
        final,
        cfg=trainer.adapter_config,
        state=state.snapshot(),
        tokenizer=inputs.tokenizer,
        system_prompt=inputs.system_prompt,
        data_info=inputs.fingerprint["data"],
        base=inputs.base,
        lora_info=inputs.lora_info,
    )
    best, final_loss = meta.get("best_val_loss"), meta.get("final_val_loss")
    log(
        f"done: {layout.run} - {meta['steps']} steps in {fmt_time(meta['wall_time_s'])}, "
        f"validation loss best {best if best is None else f'{best:.4f}'} (step {meta['best_step']}), "
        f"final {final_loss if final_loss is None else f'{final_loss:.4f}'}; the adapter shipped "
        f"is the {meta['adapter_source']} one (step {meta['adapter_step']})"
    )
    log(
        f"next: make eval NAME={layout.name} | make worker NAME={layout.name} | "
        f"see {layout.run / 'INTEGRATION_GUIDE.md'}"
    )


# --------------------------------------------------------------------------- entry point


def main(argv=None):
    global DIST
    args = parse_args(argv)
    if os.environ.get("MLX_RANK") is not None:  # started by mlx.launch (train.launch)
        # train.launch starts mlx.launch with Ctrl-C ignored (the ranks handle it), and the
        # ranks inherit that: take it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            DIST = Dist.from_environment()
        except Exception as e:
            log(
                f"error: cannot join the distributed run (rank {os.environ.get('MLX_RANK')}): "
                f"{type(e).__name__}: {e}",
                every_rank=True,
            )
            return EXIT_PEER
        if DIST.size > 1:
            DIST.watch_launcher(EXIT_PEER)
            log(
                f"process {DIST.rank} of {DIST.size}: pid {os.getpid()} on {socket.gethostname()}",
                every_rank=True,
            )
    try:
        return run(args)
    except ConfigError as e:
        leaving()
        log(f"error: {e}", every_rank=True)
        return EXIT_CONFIG
    except Stop as e:
        return stopped(e)
    except PeerLost as e:
        leaving()
        log(
            f"error: lost contact with the other processes of this run ({e}); another one "
            "stopped or crashed (see the messages above). This process stops too; run the same "
            "command to continue from the last checkpoint.",
            every_rank=True,
        )
        return EXIT_PEER
    except KeyboardInterrupt:
        leaving()
        log("interrupted; run the same command to continue from the last checkpoint")
        return EXIT_INTERRUPTED


def stopped(e):
    """A Stop's message and exit code. NaN and interruptions are decided together (the loss
    and the stop flag are summed over the processes): rank 0 reports them for all."""
    leaving()
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


def leaving():
    """A distributed process on its way out with its message: when another process exits
    first, mlx.launch sends the rest SIGTERM, which must not cut the message (or rank 0's
    last checkpoint) short."""
    if DIST.size > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
