"""The single config loader: defaults here, train/config.yaml over them, overrides last.

Keys are named like mlx_lm.lora's where they overlap, so an mlx-lm YAML config carries over.
An unknown key is an error that names the file and the key.
"""

import copy
import re
from pathlib import Path

import yaml

from train import paths

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
    "fine_tune_type": "lora",          # lora | dora | full
    "num_layers": 16,                  # transformer blocks to adapt, from the top; -1 = all
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0, "keys": None},
    "mask_prompt": True,               # loss on assistant tokens only
    # --- optimisation ---
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "sgd": {}, "adafactor": {}, "muon": {}},
    "batch_size": "auto",              # int, or auto: the largest that fits memory
    "auto_batch": {"max_batch_size": 64, "memory_fraction": 0.8},   # how auto probes
    "grad_accumulation_steps": 1,
    "grad_checkpoint": False,
    "iters": 1000,
    "learning_rate": 1e-5,
    # cosine: linear warmup over `warmup` steps from warmup_init, then cosine decay to min_lr.
    # An mlx-lm schedule ({name: cosine_decay, arguments: [...], warmup: N}) works as well.
    "lr_schedule": {"name": "cosine", "warmup": 0, "min_lr": 0.0, "warmup_init": 0.0,
                    "arguments": None},
    "max_seq_length": 2048,
    # --- evaluation, checkpoints, logging ---
    "val_batches": -1,                 # -1 = the whole validation set
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 200,
    "keep_last": 3,
    "patience": 0,                     # evaluations without improvement before stopping; 0 = never
    "min_delta": 0.0,
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
IGNORED_MLX_LM_KEYS = {"train", "test", "test_batches", "adapter_path", "resume_adapter_file",
                       "report_to", "project_name", "config", "wandb"}


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
            _merge(base[key], value, f"{where}: {key}", strict=key != "optimizer_config")
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
