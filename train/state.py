"""What a training run remembers between steps and across restarts (pure logic, no mlx):

RunState       step, best, patience, history, counters; snapshot() -> the checkpoint's
               training_state.json, restore() <- it, record_val() keeps best and patience
fingerprint    what decides the weights a run produces (config, data, base, processes, and
               the encoded examples token for token); describe_changes() says what
               differs, so a resume is never silently wrong
"""

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field, fields

import numpy as np

# The config keys that decide the weights a run produces. A checkpoint made under other
# values (or other data, or another base model) is not resumed silently.
TRAJECTORY_KEYS = (
    "fine_tune_type",
    "num_layers",
    "lora_parameters",
    "mask_prompt",
    "optimizer",
    "optimizer_config",
    "batch_size",
    "grad_accumulation_steps",
    "iters",
    "learning_rate",
    "lr_schedule",
    "max_seq_length",
    "seed",
    "system_prompt",
)


# the reporting window: the steps' training losses, and their replay KL (replay.py) apart
EMPTY_REPORT = {"loss_sum": 0.0, "steps": 0, "replay_sum": 0.0, "replay_steps": 0}


@dataclass
class RunState:
    step: int = 0
    done: bool = False
    stop_reason: str | None = None  # completed | early_stopping
    batch_size: int | None = None
    best: dict | None = None  # {"step", "val_loss"}: the lowest validation loss
    patience_ref: float | None = None  # the loss later evaluations must beat by min_delta
    patience_counter: int = 0  # evaluations since it was last beaten
    val_history: list = field(default_factory=list)  # [[step, val_loss]]
    final_val_loss: float | None = None
    report: dict = field(default_factory=lambda: dict(EMPTY_REPORT))
    tokens_seen: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0

    def snapshot(self):
        """A JSON-able copy (the checkpoint's training_state.json carries these keys)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def restore(cls, saved, **override):
        """From a checkpoint's training_state.json (keys it lacks keep their defaults)."""
        names = {f.name for f in fields(cls)}
        state = cls(**{**{k: v for k, v in saved.items() if k in names}, **override})
        state.report = {**EMPTY_REPORT, **state.report}  # a checkpoint from before replay lacks keys
        return state

    def record_val(self, step, val_loss, min_delta=0.0, patience=0):
        """Record one validation loss; True when it is the best so far. An evaluation that
        does not beat the patience reference by more than min_delta counts towards patience;
        after `patience` of them (0: never) the run is done (early_stopping)."""
        self.val_history.append([step, val_loss])
        if step > 0:
            self.final_val_loss = val_loss
        new_best = step > 0 and (self.best is None or val_loss < self.best["val_loss"])
        if new_best:
            self.best = {"step": step, "val_loss": val_loss}
        if step > 0:
            if self.patience_ref is None or val_loss < self.patience_ref - min_delta:
                self.patience_ref, self.patience_counter = val_loss, 0
            else:
                self.patience_counter += 1
            if patience and self.patience_counter >= patience:
                self.done, self.stop_reason = True, "early_stopping"
        return new_best

    def add_report(self, loss, replay=None):
        """One step's training loss and replay KL (None where the step had none)."""
        for value, total, steps in ((loss, "loss_sum", "steps"), (replay, "replay_sum", "replay_steps")):
            if value is not None:
                self.report[total] += value
                self.report[steps] += 1

    def take_report(self):
        """(mean training loss, mean replay KL) since the last report (None where no step had
        one), and a fresh window."""
        report, self.report = self.report, dict(EMPTY_REPORT)
        loss = report["loss_sum"] / report["steps"] if report["steps"] else None
        replay = report["replay_sum"] / report["replay_steps"] if report["replay_steps"] else None
        return loss, replay


# --------------------------------------------------------------------------- the fingerprint


def fingerprint(cfg, train_info, valid_info, base_hash, world_size=1, replay_info=None, encoded=None):
    """What a run's trajectory depends on. The replay text and its weight, and the question noise,
    enter only when a run has them. encoded: the hash of the examples as training reads them
    (batches.examples_sha256), which catches what the files and settings do not name: the
    noised copies, the replay windows, a change in prompt rendering or tokenization."""
    config = {k: cfg[k] for k in TRAJECTORY_KEYS}
    if cfg.get("question_noise"):
        config["question_noise"] = cfg["question_noise"]
    if cfg.get("question_noise") and cfg.get("question_noise_follow_ups"):  # absent at 0, as before it
        config["question_noise_follow_ups"] = cfg["question_noise_follow_ups"]
    data = {"train": train_info, "valid": valid_info}
    if replay_info:
        config["replay_weight"], data["replay"] = cfg["replay"]["weight"], replay_info
        if cfg["replay"].get("repeat", 1) != 1:  # absent at 1, as in checkpoints from before it
            config["replay_repeat"] = cfg["replay"]["repeat"]
        if cfg["replay"].get("per_step", 0):  # absent at 0, as in checkpoints from before it
            config["replay_per_step"] = cfg["replay"]["per_step"]
    canonical = json.dumps(config, sort_keys=True, ensure_ascii=False).encode("utf-8")
    fp = {
        "config": config,
        "config_sha256": hashlib.sha256(canonical).hexdigest(),
        "data": data,
        "base_model": {"name": cfg["model"], "hash": base_hash},
        "world_size": world_size,
    }
    return {**fp, "encoded_sha256": encoded} if encoded else fp


def fingerprint_id(fp):
    """48 bits that differ when the trajectory differs (the processes of a run compare them)."""
    key = [
        fp["config_sha256"],
        fp["data"]["train"]["sha256"],
        fp["data"]["valid"]["sha256"],
        fp["base_model"]["hash"],
        fp.get("world_size", 1),
    ] + ([fp["data"]["replay"]["sha256"]] if fp["data"].get("replay") else [])
    key += [fp["encoded_sha256"]] if fp.get("encoded_sha256") else []
    return int(hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12], 16)


def _dump(value):
    return json.dumps(value, ensure_ascii=False)


def describe_changes(old, new):
    """What differs between a checkpoint's fingerprint and this run's, one line each."""
    changes = [
        f"{key}: {_dump(old['config'].get(key))} -> {_dump(new['config'].get(key))}"
        for key in (
            *TRAJECTORY_KEYS,
            "replay_weight",
            "replay_repeat",
            "replay_per_step",
            "question_noise",
            "question_noise_follow_ups",
        )
        if old["config"].get(key) != new["config"].get(key)
    ]
    for split in ("train", "valid", "replay"):
        a, b = old["data"].get(split) or {}, new["data"].get(split) or {}
        if a.get("sha256") != b.get("sha256"):
            changes.append(
                f"{split} data changed: {b.get('path')} ({a.get('count')} -> {b.get('count')} "
                f"{'texts' if split == 'replay' else 'conversations'}, "
                f"sha256 {str(a.get('sha256'))[:12]} -> {str(b.get('sha256'))[:12]})"
            )
    a, b = old["base_model"], new["base_model"]
    if a.get("hash") != b.get("hash"):
        changes.append(
            f"base model changed: {a.get('name')} -> {b.get('name')} "
            f"(hash {str(a.get('hash'))[:12]} -> {str(b.get('hash'))[:12]})"
        )
    a, b = old.get("world_size", 1), new.get("world_size", 1)
    if a != b:
        changes.append(
            f"processes (NPROC / HOSTFILE hosts): {a} -> {b} (batch_size is per "
            f"process, so each step's batch changes: {a} x batch_size -> {b} x batch_size)"
        )
    a, b = old.get("encoded_sha256"), new.get("encoded_sha256")
    if not changes and a and b and a != b:  # checkpoints from before it are compared without it
        changes.append(
            "the examples encode to other tokens though the files and settings are the same (the "
            "noised questions, the replay windows, the prompt rendering or the tokenizer changed): "
            f"sha256 {a[:12]} -> {b[:12]}"
        )
    return changes


# --------------------------------------------------------------------------- seeds and RNGs


def step_seed(seed, step, rank=0):
    """The seed of the RNG (LoRA dropout) at a step: a function of (seed, step) only. Process
    `rank` of a distributed run draws its own dropout masks for its share of the batch (so
    dropout differs from a single process's, and the runs agree only in distribution when
    lora_parameters.dropout > 0)."""
    key = [int(seed), int(step)] + ([int(rank)] if rank else [])
    return int(np.random.SeedSequence(key).generate_state(1, np.uint32)[0])


def host_rng_state():
    """numpy's and Python's global RNG states, JSON-able."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }


def set_host_rng_state(rng):
    if rng.get("numpy"):
        np.random.set_state(tuple(rng["numpy"]))
    if rng.get("python"):
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
