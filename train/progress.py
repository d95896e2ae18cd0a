"""What a run reports as it goes. On stderr (rank 0): the plan, a line per report (mean training
loss since the last one, learning rate, throughput, peak memory, elapsed time and ETA), a line
per validation (best, patience, early stopping) and the summary at the end (Progress,
finished). In logs/NAME/metrics.jsonl: one record per report or validation (record; Metrics
writes and flushes each line, NoMetrics on the processes that do not write; keep_metrics_until
cuts the file back to the step a run resumes from)."""

import json
import time
from pathlib import Path

from core import atomic
from train import bundle


class Progress:
    """This session's clocks and counters (elapsed time across restarts, the throughput window,
    the steps for the ETA) and the lines the loop prints."""

    def __init__(self, log, elapsed_before):
        self.log = log
        self.session_start = self.window_start = time.perf_counter()
        self.elapsed_before, self.steps, self.window_tokens = elapsed_before, 0, 0

    def elapsed(self):
        """Seconds of training, those of the sessions before this one included."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def plan(self, trainer, dist_size):
        """What the run is about to do, and where it writes."""
        cfg, accum, inputs = trainer.cfg, trainer.accum, trainer.inputs
        per_process = (
            f" per process x {dist_size} processes = {trainer.global_batch_size}" if dist_size > 1 else ""
        )
        self.log(
            f"{len(inputs.train_set)} training / {len(inputs.valid_set)} validation examples"
            f"{f' + {len(inputs.replay_set)} replay windows ({self.replay_plan(trainer)})' if inputs.replay_set else ''}"
            f", batch size "
            f"{trainer.state.batch_size}{per_process}{f' x {accum} accumulated' if accum > 1 else ''}, "
            f"{len(trainer.train_batches)} batches per epoch, {cfg['iters']} steps, learning rate "
            f"{cfg['learning_rate']:g} ({(cfg['lr_schedule'] or {}).get('name') or 'constant'})"
        )
        frozen = trainer.loss.frozen
        if frozen is not None and frozen.on:
            self.log(
                f"the {frozen.frozen} blocks below the adapted ones are frozen: their output for a batch "
                f"is kept from its first pass (up to {frozen.budget / 2**20:g} MB, TRAIN_KEEP_FROZEN_MB)"
            )
        self.log(
            f"checkpoints every {cfg['save_every']} steps in {trainer.layout.checkpoints}; "
            f"metrics in {trainer.layout.metrics}"
        )

    @staticmethod
    def replay_plan(trainer):
        """How the replay windows are trained: per step or as batches; the base's part kept."""
        per_step = trainer.replay_per_step
        kept = trainer.replay_loss.kept is not None
        return (f"{per_step} in every step" if per_step else "as batches") + (
            "; the base model's pass over each kept from its first step" if kept else ""
        )

    def report(self, step, iters, lr, elapsed, train_loss, replay_kl=None):
        """The step line: the training loss (and the replay KL, where the window had replay
        steps), the throughput since the last report, the ETA; returns what metrics.jsonl
        records of it."""
        import mlx.core as mx

        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_start, self.window_tokens = now, 0
        eta = (now - self.session_start) / self.steps * (iters - step)
        self.log(
            f"step {step:>{len(str(iters))}}/{iters} | loss {_num(train_loss)}"
            f"{'' if replay_kl is None else f' | replay KL {replay_kl:.4f}'} | lr {lr:.2e} | "
            f"{tps:,.0f} tok/s | peak {mx.get_peak_memory() / 1e9:.2f} GB | "
            f"{fmt_time(elapsed)} elapsed, ETA {fmt_time(eta)}"
        )
        return {"train_loss": train_loss, "tokens_per_s": tps, "replay_kl": replay_kl}

    def validation(self, step, iters, val, state, cfg):
        """The validation line: the loss, the best so far, patience; early stopping."""
        width, patience = len(str(iters)), cfg["patience"]
        if step == 0:
            self.log(f"step {0:>{width}}/{iters} | val {val:.4f} (before training)")
            return
        self.log(
            f"step {step:>{width}}/{iters} | val {val:.4f} | best {state.best['val_loss']:.4f} "
            f"(step {state.best['step']})"
            + (f" | {state.patience_counter}/{patience} without improvement" if patience else "")
        )
        if state.stop_reason == "early_stopping":
            self.log(
                f"early stopping at step {step}: no improvement of more than "
                f"{cfg['min_delta']:g} for {patience} evaluations"
            )


def finished(log, layout, meta):
    """The summary once the bundle is written (meta: its metadata.json), and what to run next."""
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


def _num(value):
    return "-" if value is None else f"{value:.4f}"


def record(step, lr, elapsed, state, train_loss=None, val_loss=None, tokens_per_s=None, replay_kl=None):
    """One line of metrics.jsonl (train_loss None where no step of the window had one), with the
    run state's counters: tokens_seen, the tokens of the conversations' batches so far, and
    trained_tokens, the loss targets among them (the answers' tokens where prompts are masked;
    mlx-lm's trained_tokens counts the same)."""
    import mlx.core as mx

    return {
        "step": step,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "lr": lr,
        "tokens_per_s": tokens_per_s,
        "peak_mem_gb": mx.get_peak_memory() / 1e9,
        "elapsed_s": elapsed,
        "tokens_seen": state.tokens_seen,
        "trained_tokens": state.trained_tokens,
        **({} if replay_kl is None else {"replay_kl": replay_kl}),  # runs with replay text only
    }


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
