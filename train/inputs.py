"""What a run trains on (Inputs): the base model with its adapters added, and the data read and
encoded as the worker renders prompts (batches.encode through core.prompt). load_inputs is the
first thing a run does; read_data is shared with `make show-data`."""

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from train import batches, bundle, eval_model, eval_sets, question_noise, replay
from train.exits import EXIT_CONFIG, Stop
from train.method import add_adapters
from train.state import fingerprint


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
    replay_set: list = field(default_factory=list)  # [(ids, 0)]: raw-text windows (replay.py)


def load_inputs(cfg, dist):
    """The base model (with adapters added) and the data, encoded. dist: this process's place
    in the run (its size is part of the fingerprint; dist.log speaks)."""
    log = dist.log
    model, tokenizer, model_config = load_base(cfg, log)
    base = bundle.base_model_identity(cfg["model"])
    train_split, valid_split, system_prompt = read_data(cfg, log)
    train_set, valid_set = (
        encode_split(tokenizer, s, system_prompt, cfg, log) for s in (train_split, valid_split)
    )
    if not train_set:
        raise Stop("error: no usable training example (all longer than max_seq_length?)", EXIT_CONFIG)
    replay_text, replay_set = read_replay_set(cfg, tokenizer, log)
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
    current = fingerprint(
        cfg,
        train_split.info,
        valid_split.info,
        base["hash"],
        dist.size,
        replay_text and replay_text.info,
        batches.examples_sha256(train_set, valid_set, replay_set),
    )
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
        replay_set,
    )


def load_base(cfg, log):
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


def read_data(cfg, log):
    """(train split with its noised questions, valid split, the system prompt training adds)."""
    data_dir = Path(cfg["data"])
    train_split = batches.read_split(data_dir / "train.jsonl")
    valid_split = batches.read_split(data_dir / "valid.jsonl")
    if not train_split.conversations:
        raise Stop(f"error: no training data in {data_dir / 'train.jsonl'} (run `make data`)", EXIT_CONFIG)
    if cfg["question_noise"]:
        train_split = add_question_noise(train_split, data_dir, cfg, log)
    data_system = batches.common_system_prompt(train_split.conversations)
    if cfg["system_prompt"] is None:
        return train_split, valid_split, data_system
    if data_system is not None and data_system != cfg["system_prompt"]:
        log(
            "warning: the training conversations carry a different system prompt than the config's; "
            "the worker will add the config's to conversations without one"
        )
    return train_split, valid_split, cfg["system_prompt"]


def add_question_noise(split, data_dir, cfg, log):
    """split with cfg question_noise noised copies of each question after its own conversations
    (each named by its source line); none is a near copy of data_dir's evaluation sets."""
    guard = eval_sets.Guard(eval_sets.load(data_dir))
    count = cfg["question_noise"]
    share = cfg["question_noise_follow_ups"]
    added = question_noise.variants(split.conversations, count, cfg["seed"], guard.near_copy, share)
    follow_ups = sum(len(m) > len(split.conversations[i]) for i, m in added)
    asked = f", {follow_ups} of them asked after another exchange of the data" if share else ""
    log(
        f"question noise: {len(added)} noised questions added to {len(split.conversations)} conversations "
        f"({count} per conversation at most; repeats and near copies of evaluation questions left out{asked})"
    )
    return replace(
        split,
        conversations=split.conversations + [messages for _, messages in added],
        lines=split.lines + [split.lines[i] for i, _ in added],
        noised=len(added),
    )


def read_replay_set(cfg, tokenizer, log):
    """(ReplayText, its windows) of cfg replay.data, or (None, []) without one."""
    path = cfg["replay"]["data"]
    if not path:
        return None, []
    try:
        text = replay.read_replay(path)
    except ValueError as e:
        raise Stop(f"error: {e}", EXIT_CONFIG) from None
    measured = {t for _, t in eval_model.general_texts()}
    if any(t in measured for _, t in text.texts):
        log(
            f"warning: {path} holds the general text `make eval` measures forgetting on "
            "(data/general/); that measure will flatter this run"
        )
    windows = replay.replay_windows(tokenizer, text)
    repeat, per_step = cfg["replay"]["repeat"], cfg["replay"]["per_step"]
    times = f", each {repeat} times an epoch" if repeat > 1 else ""
    times += f", {per_step} in every step" if per_step else ", as batches in every epoch"
    log(
        f"replay: {len(windows)} windows of up to {replay.WINDOW} tokens from {path}{times}, "
        f"KL to the base model x {cfg['replay']['weight']}"
    )
    return text, windows * repeat


def encode_split(tokenizer, split, system_prompt, cfg, log):
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
