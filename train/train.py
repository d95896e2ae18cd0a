"""Fine-tune a base model on the prepared chat data: LoRA by default, DoRA or full weights.

    python -m train.train --config train/config.yaml --name farense [--model M] [--data D]
        [--iters N] [--batch-size N|auto] [--learning-rate X] [--save-every N]
        [--eval-every N] [--seed N] [--patience N] [--lora-rank N] [--lora-layers N]
        [--set key=value ...] [--fresh] [--resume PATH] [--keep best|last]
        [--models-dir DIR] [--logs-dir DIR]

(`make train` builds this command; train/options.py holds the options.) The config's keys are
mlx_lm.lora's; the options and --set override them. With a quantized base LoRA is QLoRA.

This file is the run and its loop; each other part is a module of train/. run(), top to
bottom: the config (options.py) -> the base and the data, adapters added (inputs.py,
method.py) -> where to start: the newest intact checkpoint, --resume PATH, or step 0
(resume.py) -> the batch size (batch_size.py) -> restore (Trainer.restore) -> fit: for each
step seed the RNG from (seed, step), take the next batches of the epoch's fixed order
(batches.py), forward/backward (loss.py: the output layer at the answer tokens only;
frozen_blocks.py: the frozen blocks' output kept per batch), stop on a non-finite loss,
update (Trainer.train_step); report (progress.py), evaluate, keep the best and count patience
(validate_and_track, state.RunState.record_val), checkpoint (save, checkpoint.py) -> write
the bundle (write_outputs, bundle.py). Everything a step depends on is a function of the
checkpoint, so an interrupted run (Ctrl-C, kill -9, power loss) rerun with the same command
ends where an uninterrupted one ends.

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

Outputs (paths.Layout): models/NAME/ (the adapter: best/'s, or last/'s with KEEP=last; best/,
last/, checkpoints/, metadata.json, ...), logs/NAME/metrics.jsonl. Exit codes (exits.py): 0 done;
2 bad configuration or refused resume; 3 non-finite loss; 4 another process of a distributed run
stopped or crashed (or its launcher is gone); 5 a checkpoint could not be written; 130
interrupted. Test hooks: TRAIN_INJECT_NAN=train:STEP|val:STEP, TRAIN_STEP_DELAY_S=seconds."""

import math
import os
import signal
import sys
import time

import numpy as np

from core.config import ConfigError
from core.paths import Layout
from train import batches, bundle, checkpoint, progress, replay
from train.batch_size import choose_batch_size
from train.dist import Dist, PeerLost
from train.exits import EXIT_INTERRUPTED, EXIT_IO, EXIT_PEER, Stop, ended, non_finite
from train.inputs import load_inputs
from train.loss import ReplayLoss, TargetLoss
from train.method import make_optimizer
from train.options import parse_args, resolve_config
from train.resume import (
    already_complete,
    find_start,
    load_warm_weights,
    load_weights_and_optimizer,
    restore_best,
)
from train.state import RunState, host_rng_state, set_host_rng_state, step_seed

DIST = Dist()  # this process's place in the run (main() joins mlx.launch's group)


def log(message, every_rank=False):
    DIST.log(message, every_rank)


# --------------------------------------------------------------------------- the run


def run(args):
    """Load the inputs, find where to start, choose the batch size, restore, fit, write the
    outputs. Every process runs this; rank 0 writes."""
    cfg = resolve_config(args, log)
    layout = Layout.for_run(args.name, args.models_dir, args.logs_dir)
    inputs = load_inputs(cfg, DIST)
    start = find_start(args, layout, inputs, DIST)
    batch_size = choose_batch_size(cfg, inputs, start, DIST)
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


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """The optimizer, the run state and the data position of one run, and the loop over
    steps: train_step, report, validate_and_track, save (as mlx-lm's tuner.trainer.train)."""

    def __init__(self, cfg, layout, inputs, batch_size):
        import mlx.nn as nn
        from mlx.utils import tree_flatten

        self.cfg, self.layout, self.inputs, self.model = cfg, layout, inputs, inputs.model
        self.global_batch_size = batch_size * DIST.size
        # windows of replay text in every step (replay.py), or batches of their own in each epoch
        self.replay_per_step = cfg["replay"]["per_step"] if inputs.replay_set else 0
        # an epoch: the conversations' batches, then the replay text's (replay.py), in one order
        self.train_batches = [
            (examples, indices, is_replay)
            for examples, is_replay in ((inputs.train_set, False), (inputs.replay_set, True))
            if not (is_replay and self.replay_per_step)
            for indices in batches.make_batches(examples, self.global_batch_size)
        ]
        self.accum = cfg["grad_accumulation_steps"]
        self.loss = TargetLoss(self.model, keep_frozen=True)  # the frozen blocks' output kept per batch
        self.loss_and_grad = nn.value_and_grad(self.model, self.loss.sum_loss)
        kept = replay.kept_bytes(self.model, inputs.replay_set, self.replay_per_step)
        self.replay_loss = ReplayLoss(self.loss, cfg["replay"]["weight"], kept)
        self.replay_loss_and_grad = nn.value_and_grad(self.model, self.replay_loss.sum_loss)
        self.optimizer = make_optimizer(cfg)
        self.optimizer.init(self.model.trainable_parameters())
        lora = {k: inputs.lora_info[k] for k in ("fine_tune_type", "num_layers", "lora_parameters")}
        self.adapter_config = dict(cfg, batch_size=batch_size, **lora)
        self.state = RunState(batch_size=batch_size)
        self.order = batches.BatchOrder(len(self.train_batches), cfg["seed"])
        self.weight_names = {k for k, _ in tree_flatten(self.model.trainable_parameters())}
        self.stop_requested = []
        inject = os.environ.get("TRAIN_INJECT_NAN", "")  # test hook: "train:12" / "val:20"
        self.inject = (inject.split(":")[0], int(inject.split(":")[1])) if ":" in inject else None
        self.step_delay = float(os.environ.get("TRAIN_STEP_DELAY_S") or 0)  # test hook

    def restore(self, start):
        """Continue from a checkpoint (weights, optimizer, state, data position, RNGs) or
        start from an adapter's weights (--resume of a plain adapter folder), if any."""
        if start.saved is None and start.warm_weights is None:
            return
        if start.warm_weights is not None:
            load_warm_weights(self.model, start, self.weight_names, log)
            return
        ckpt, saved = start.saved, start.saved.state
        load_weights_and_optimizer(self.model, self.optimizer, ckpt, self.weight_names, log)
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
                progress.keep_metrics_until(self.layout.metrics, ckpt.step)
            restore_best(self.state.best, ckpt.path.parent, self.layout.best, log)
        log(
            f"resuming from {ckpt.path} (step {ckpt.step}/{self.cfg['iters']}, epoch {self.order.epoch}, "
            f"batch {self.order.index}/{self.order.n_batches})"
        )

    # ---- the loop ------------------------------------------------------------------------

    def fit(self):
        """Train to cfg.iters (or early stopping); returns the final checkpoint's folder."""
        self._begin()
        iters = self.cfg["iters"]
        while self.state.step < iters:
            step = self.state.step + 1
            stop_votes = self.train_step(step)
            lr, elapsed = self.learning_rate(), self.progress.elapsed()
            reported = self.report(step, lr, elapsed)
            val_loss, new_best = self.validate_and_track(step)
            if reported or val_loss is not None:
                self.metrics.write(
                    progress.record(step, lr, elapsed, self.state, val_loss=val_loss, **(reported or {}))
                )
            if step == iters:
                self.state.done, self.state.stop_reason = True, self.state.stop_reason or "completed"
            self.state.step, self.state.elapsed_s = step, self.progress.elapsed()
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
        self.progress = progress.Progress(log, self.state.elapsed_s)
        self.progress.plan(self, DIST.size)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        # opened after restore(), which rewrites the file (keep_metrics_until)
        self.metrics = progress.Metrics(self.layout.metrics) if DIST.main else progress.NoMetrics()
        self.model.train()
        if self.state.step == 0 and self.inputs.valid_set:
            val, _ = self.validate_and_track(0)
            self.metrics.write(progress.record(0, self.learning_rate(), 0.0, self.state, val_loss=val))

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
        gradient of the batch's mean). A replay batch's loss is its KL to the base model
        (loss.ReplayLoss); with replay.per_step, the KL of the step's replay windows is a term
        of every step's loss instead. Returns (grads, {"loss", "replay"}: the step's mean of
        each, None where it had none, grad norm, trained targets, stop votes)."""
        import mlx.core as mx
        from mlx.utils import tree_flatten, tree_map

        mx.random.seed(step_seed(self.cfg["seed"], step, DIST.rank))
        grads, sums, counts = None, [mx.array(0.0), mx.array(0.0)], [0, 0]
        for _ in range(self.accum):
            examples, indices, is_replay = self.train_batches[self.order.next()]
            loss_and_grad = self.replay_loss_and_grad if is_replay else self.loss_and_grad
            g, local_sum, n = self.batch_gradient(examples, indices, loss_and_grad)
            if g is None:  # a last batch smaller than the ranks
                g = tree_map(mx.zeros_like, self.model.trainable_parameters())
            grads = g if grads is None else tree_map(mx.add, grads, g)
            sums[is_replay], counts[is_replay] = sums[is_replay] + local_sum, counts[is_replay] + n
            mx.eval(grads, sums)
        if self.accum > 1:
            grads = tree_map(lambda x: x / self.accum, grads)
        if self.replay_per_step:
            windows = self.inputs.replay_set
            indices = replay.windows_at(step, self.replay_per_step, len(windows), self.cfg["seed"])
            g, local_sum, n = self.batch_gradient(windows, indices, self.replay_loss_and_grad)
            grads = grads if g is None else tree_map(mx.add, grads, g)
            sums[1], counts[1] = sums[1] + local_sum, counts[1] + n
            mx.eval(grads, sums)
        grads = DIST.sum_tree(grads)
        loss, kl, stops = DIST.all_sum_floats([s.item() for s in sums] + [float(bool(self.stop_requested))])
        means = {
            "loss": loss / counts[0] if counts[0] else None,
            "replay": kl / counts[1] if counts[1] else None,
        }
        grad_sq = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads))
        return grads, means, math.sqrt(grad_sq.item()), counts[0], stops

    def batch_gradient(self, examples, indices, loss_and_grad):
        """This process's share of one global batch: (its gradient, None where it has no share;
        its loss sum; the whole batch's target count). Counts the batch's tokens."""
        import mlx.core as mx

        n_tokens = batches.token_count(examples, indices)
        self.state.tokens_seen += n_tokens
        self.progress.window_tokens += n_tokens
        n, mine = batches.target_count(examples, indices), batches.shard(indices, DIST.rank, DIST.size)
        if not mine:
            return None, mx.array(0.0), n
        batch, lengths, _ = batches.collate(examples, mine)
        self.loss.frozen.keep(self.model, batch[:, :-1])
        if loss_and_grad is self.replay_loss_and_grad:  # the base's part of these windows, once
            self.replay_loss.keep_base(self.model, batch, lengths)
        (_, local_sum), g = loss_and_grad(self.model, batch, lengths, float(n))
        return g, local_sum, n

    def train_step(self, step):
        """Gradients, the finite checks, the update; returns the processes' stop votes."""
        import mlx.core as mx

        grads, means, grad_norm, n_targets, stop_votes = self.gradients(step)
        if self.inject == ("train", step):
            means = {key: math.nan for key in means}
        for key, what in (("loss", "the training loss"), ("replay", "the replay KL")):
            if means[key] is not None and not math.isfinite(means[key]):
                self.fail(step, what, means[key])
        if not math.isfinite(grad_norm):
            self.fail(step, "the gradient norm", grad_norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        del grads
        self.state.trained_tokens += int(n_targets)
        self.state.add_report(means["loss"], means["replay"])
        self.progress.steps += 1
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.cfg["clear_cache_threshold"] and mx.get_cache_memory() > self.cfg["clear_cache_threshold"]:
            mx.clear_cache()
        return stop_votes

    # ---- report, validate, save ----------------------------------------------------------

    def report(self, step, lr, elapsed):
        """Every steps_per_report steps (and the last): the mean training loss since the last
        report and the throughput, on stderr; returns them for the metrics, else None."""
        iters = self.cfg["iters"]
        if step % self.cfg["steps_per_report"] and step != iters:
            return None
        return self.progress.report(step, iters, lr, elapsed, *self.state.take_report())

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
            loss_fn=self.loss.mean_loss,
            rank=DIST.rank,
            size=DIST.size,
            all_sum=DIST.all_sum_floats,
        )
        if self.inject == ("val", step):
            val = math.nan
        if not math.isfinite(val):
            self.fail(step, "the validation loss", val)
        new_best = self.state.record_val(step, val, self.cfg["min_delta"], self.cfg["patience"])
        self.progress.validation(step, iters, val, self.state, self.cfg)
        return val, new_best

    def save(self, step, new_best=False):
        """Checkpoint `step` (and best/ when it is the best); prune old checkpoints. A write
        that fails (a full disk, a read-only folder) stops the run; the previous one stays."""
        from mlx.utils import tree_flatten

        root = self.layout.checkpoints
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        optimizer = dict(tree_flatten(self.optimizer.state))
        try:
            path = checkpoint.save(root, step, weights, self.adapter_config, optimizer, self.snapshot(step))
            if new_best:
                checkpoint.write_adapter_dir(path, self.layout.best, {"best.json": self.state.best})
        except (OSError, RuntimeError) as e:  # mlx's writer raises RuntimeError on a full disk
            raise Stop(checkpoint.write_error(root, step, e), EXIT_IO) from None
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

    def learning_rate(self):
        return float(self.optimizer.learning_rate.item())

    def fail(self, step, what, value):
        last = checkpoint.list_steps(self.layout.checkpoints)
        last_name = last[-1][1].name if last else "none"
        raise non_finite(step, what, value, self.learning_rate(), last_name, self.state.best)


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
    progress.finished(log, layout, meta)


# --------------------------------------------------------------------------- entry point


def main(argv=None):
    global DIST
    args = parse_args(argv)
    if os.environ.get("MLX_RANK") is not None:  # started by mlx.launch (train.launch)
        try:
            DIST = Dist.join_launched(EXIT_PEER)
        except Exception as e:
            log(
                f"error: cannot join the distributed run (rank {os.environ.get('MLX_RANK')}): "
                f"{type(e).__name__}: {e}",
                every_rank=True,
            )
            return EXIT_PEER
    try:
        return run(args)
    except (ConfigError, Stop, PeerLost, KeyboardInterrupt) as e:
        return ended(e, DIST)


if __name__ == "__main__":
    sys.exit(main())
