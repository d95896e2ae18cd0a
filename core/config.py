"""Configuration in one place: the defaults, the YAML file over them, the command line over
that, and the checks - for every entry point (train, prepare_data, evaluate, fuse, the worker's
generation defaults).

    load_config(path, overrides)   defaults <- YAML <- {dotted.key: value}
    from_args(args, OPTION_KEYS)   the same from argparse options and --set KEY=VALUE
    check_config(cfg, keys)        every value, or the named ones; raises ConfigError naming
                                   the key, returns notes worth printing

Keys are named like mlx_lm.lora's where they overlap, so an mlx-lm YAML config carries over.
An unknown key is an error that names the file and the key.
"""

import copy
import math
import re
from pathlib import Path

import yaml

from core import paths, schedules

DEFAULTS = {
    # --- base model and data ---
    "model": "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
    "data": "data",
    "raw": "data/raw",
    "seed": 0,
    "valid_fraction": 0.1,
    "system_prompt": None,
    "trust_remote_code": False,
    # --- method ---
    "fine_tune_type": "lora",  # lora | dora | full
    "num_layers": 16,  # transformer blocks to adapt, from the top; -1 = all
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0, "keys": None},
    "mask_prompt": True,  # loss on assistant tokens only
    "train_on": "last",  # last | all_assistant: the assistant turns trained
    "question_noise": 0,  # noised copies of each training question (train/question_noise.py)
    "question_noise_follow_ups": 0.0,  # the share of them asked after another exchange of the data
    # raw text (a .txt file or a folder of them) on which training keeps the model's next-token
    # predictions close to the base model's (a KL term, weight x per token; train/replay.py)
    # per_step: windows of it in every step's loss; 0: batches of their own in each epoch
    "replay": {"data": None, "weight": 1.0, "repeat": 1, "per_step": 1},
    # --- optimisation ---
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "sgd": {}, "adafactor": {}, "muon": {}},
    "batch_size": "auto",  # int, or auto: the largest that fits memory
    "auto_batch": {"max_batch_size": 64, "memory_fraction": 0.8},  # how auto probes
    "grad_accumulation_steps": 1,
    "grad_checkpoint": False,
    "iters": 1000,
    "learning_rate": 1e-5,
    # cosine: linear warmup over `warmup` steps from warmup_init, then cosine decay to min_lr
    # (the names: core/schedules.py). An mlx-lm schedule ({name: cosine_decay, arguments:
    # [...], warmup: N}) works as well.
    "lr_schedule": {"name": "cosine", "warmup": 0, "min_lr": 0.0, "warmup_init": 0.0, "arguments": None},
    "max_seq_length": 2048,
    # --- evaluation, checkpoints, logging ---
    "val_batches": -1,  # -1 = the whole validation set
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 200,
    "keep_last": 3,
    "patience": 0,  # evaluations without improvement before stopping; 0 = never
    "min_delta": 0.0,
    "keep": "best",  # best | last: the adapter the bundle ships (the other in best/ or last/)
    "clear_cache_threshold": 0,
    # --- generation defaults (saved to metadata.json, used by the worker) ---
    "generation": {
        "max_tokens": 256,
        "max_tokens_cap": 2048,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    },
}

# YAML 1.1 reads "1e-5" as a string; accept it as a float (as mlx_lm.lora does).
_Loader = type("_Loader", (yaml.SafeLoader,), {})
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

# mlx-lm keys that mean nothing here but are harmless in a carried-over config.
IGNORED_MLX_LM_KEYS = {
    "train",
    "test",
    "test_batches",
    "adapter_path",
    "resume_adapter_file",
    "report_to",
    "project_name",
    "config",
    "wandb",
}


class ConfigError(ValueError):
    pass


def parse_value(text):
    """A command-line override as YAML would read it: '1e-4' -> 1e-4, 'true' -> True."""
    if not isinstance(text, str):
        return text
    value = yaml.load(text, _Loader)
    return text if value is None and text.strip() not in ("", "null", "~") else value


def _merge(base, update, where, strict):
    for key, value in update.items():
        if key not in base:
            if key in IGNORED_MLX_LM_KEYS:
                continue
            if strict:
                raise ConfigError(f"{where}: unknown key '{key}'")
        if isinstance(base.get(key), dict) and isinstance(value, dict):
            _merge(base[key], value, f"{where}: {key}", strict=strict and key != "optimizer_config")
        else:
            base[key] = value


def load_config(path=None, overrides=None, defaults=DEFAULTS):
    """defaults <- YAML file <- overrides ({'a.b': value} or {'a': value}); returns a dict."""
    cfg = copy.deepcopy(defaults)
    path = Path(path) if path else paths.CONFIG
    if path.exists():
        try:
            user = yaml.load(path.read_text(encoding="utf-8"), _Loader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        _merge(cfg, user, str(path), strict=True)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        keys = dotted.split(".")
        node = cfg
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {dotted}: unknown key '{k}'")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"override {dotted}: unknown key '{keys[-1]}'")
        node[keys[-1]] = parse_value(value)
    return cfg


def from_args(args, option_keys, config_path=None):
    """The config of an entry point: its --config file, its options (option_keys maps an
    argparse dest to a dotted config key; None values are not given) and --set KEY=VALUE."""
    config_path = config_path or getattr(args, "config", None)
    if config_path and not Path(config_path).is_file():
        raise ConfigError(f"{config_path}: no such config file")
    overrides = {}
    for item in getattr(args, "set", None) or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value
    for option, key in option_keys.items():
        if getattr(args, option, None) is not None:
            overrides[key] = getattr(args, option)
    return load_config(config_path, overrides)


# --------------------------------------------------------------------------- checks

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")
TRAIN_ON = ("last", "all_assistant")
KEEP = ("best", "last")
REPLAY_WINDOW = 128  # tokens per window of replay text (train/replay.py; the memory model's too)


def _is_int(lo):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(names):
    return lambda v: v in names


POSITIVE = (_is_int(1), "a positive integer")
# key -> (test, what it must be). Nested keys are dotted.
RULES = {
    "fine_tune_type": (_one_of(FINE_TUNE_TYPES), "one of " + ", ".join(FINE_TUNE_TYPES)),
    "optimizer": (lambda v: str(v).lower() in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    "batch_size": (lambda v: v == "auto" or _is_int(1)(v), "a positive integer or auto"),
    **{
        k: POSITIVE
        for k in (
            "iters",
            "grad_accumulation_steps",
            "save_every",
            "steps_per_eval",
            "steps_per_report",
            "keep_last",
        )
    },
    "max_seq_length": (_is_int(2), "an integer >= 2"),
    "patience": (_is_int(0), "an integer >= 0"),
    "seed": (_is_int(0), "an integer >= 0"),
    "val_batches": (_is_int(-1), "-1 (all) or an integer >= 0"),
    "learning_rate": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "min_delta": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "num_layers": (lambda v: _is_int(-1)(v) and v != 0, "-1 (all) or a positive integer"),
    "system_prompt": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "valid_fraction": (lambda v: _is_num(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "train_on": (_one_of(TRAIN_ON), "one of " + ", ".join(TRAIN_ON)),
    "question_noise": (_is_int(0), "an integer >= 0"),
    "question_noise_follow_ups": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "keep": (_one_of(KEEP), "one of " + ", ".join(KEEP)),
    "lora_parameters.rank": (_is_int(1), "a positive integer"),
    "lora_parameters.scale": (_is_num, "a number"),
    "lora_parameters.dropout": (lambda v: _is_num(v) and 0 <= v < 1, "in [0, 1)"),
    "lora_parameters.keys": (
        lambda v: v is None or (isinstance(v, list) and v and all(isinstance(k, str) and k for k in v)),
        "null (every linear layer of a block) or a list of module names, e.g. [self_attn.q_proj, self_attn.v_proj]",
    ),
    "lr_schedule": (lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    "lr_schedule.name": (
        lambda v: v is None or v in schedules.SCHEDULES,
        " or ".join(sorted(schedules.SCHEDULES)) + " (or an mlx-lm schedule with arguments)",
    ),
    "lr_schedule.warmup": (lambda v: _is_int(0)(v or 0), "an integer >= 0"),
    "replay.data": (lambda v: v is None or (isinstance(v, str) and v != ""), "a path or null"),
    "replay.weight": (lambda v: _is_num(v) and v > 0, "a positive number"),
    "replay.repeat": (_is_int(1), "a positive integer"),
    "replay.per_step": (_is_int(0), "an integer >= 0"),
    "auto_batch.max_batch_size": (_is_int(1), "a positive integer"),
    "auto_batch.memory_fraction": (lambda v: _is_num(v) and 0 < v <= 1, "in (0, 1]"),
}


def get(cfg, dotted):
    """cfg["a"]["b"] for "a.b"; None where a level is missing."""
    node = cfg
    for k in dotted.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _applies(cfg, key):
    """The rules that depend on other values: LoRA's parameters, our own schedules."""
    if key.startswith("lora_parameters."):
        return cfg.get("fine_tune_type") != "full"
    if key.startswith("lr_schedule."):
        sched = cfg.get("lr_schedule")
        return bool(sched) and isinstance(sched, dict) and sched.get("arguments") is None
    return True


def check_config(cfg, keys=None):
    """Check every rule (or those of `keys` and their sub-keys); raise ConfigError naming the
    first bad value. Returns notes: settings that are valid but likely not meant."""
    for key, (test, what) in RULES.items():
        if keys is not None and key.split(".")[0] not in keys:
            continue
        if _applies(cfg, key) and not test(get(cfg, key)):
            raise ConfigError(f"{key} must be {what}, got {get(cfg, key)!r}")
    if (keys is None or "replay" in keys) and get(cfg, "replay.data") and cfg.get("fine_tune_type") != "lora":
        raise ConfigError(
            "replay.data needs fine_tune_type: lora (the base model's predictions come from "
            f"switching the LoRA adapters off), got {cfg.get('fine_tune_type')!r}"
        )
    replay_on = (keys is None or "replay" in keys) and get(cfg, "replay.data")
    if replay_on and get(cfg, "replay.per_step") and get(cfg, "replay.repeat") != 1:
        raise ConfigError(
            f"replay.repeat ({get(cfg, 'replay.repeat')}) puts replay batches in an epoch more often; "
            f"with replay.per_step ({get(cfg, 'replay.per_step')}) every step has replay windows: "
            "leave repeat at 1 and raise replay.weight or replay.per_step instead"
        )
    notes = []
    if (keys is None or "question_noise_follow_ups" in keys) and get(cfg, "question_noise_follow_ups"):
        if not get(cfg, "question_noise"):
            notes.append(
                "note: question_noise_follow_ups asks a share of the noised questions as follow-ups, "
                "and question_noise is 0: there are none"
            )
    warmup = (get(cfg, "lr_schedule.warmup") or 0) if _applies(cfg, "lr_schedule.warmup") else 0
    if (keys is None or "lr_schedule" in keys) and warmup >= cfg["iters"]:
        notes.append(
            f"note: lr_schedule.warmup ({warmup}) >= iters ({cfg['iters']}): the learning "
            "rate never reaches its peak"
        )
    return notes
