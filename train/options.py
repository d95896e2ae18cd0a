"""The command line of `python -m train.train` (parse_args) and the config it resolves to:
defaults <- --config <- the options and --set (resolve_config, through core.config)."""

import argparse

from core.config import check_config, from_args
from core.paths import CONFIG

DESCRIPTION = "Fine-tune a base model on the prepared chat data: LoRA by default, DoRA or full weights."

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train", description=DESCRIPTION)
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


def resolve_config(args, log):
    """defaults <- --config <- options and --set; checked (config.py); its notes go to log."""
    cfg = from_args(args, OPTION_KEYS)
    for note in check_config(cfg):
        log(note)
    return cfg
