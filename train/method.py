"""The method, as mlx-lm's tuner sets it up: adapters on the frozen base (add_adapters: LoRA,
DoRA or full weights of the top num_layers blocks), the optimizer with its learning-rate
schedule (make_optimizer, set_tree_leaves to put a checkpoint's state back). The loss is
train/loss.py's."""

from core import schedules
from core.config import ConfigError


def add_adapters(model, cfg):
    """Freeze the base and make the chosen part trainable; returns lora_config.json's data."""
    from mlx.utils import tree_flatten
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
        _add_lora(model, num_layers, cfg)
    if cfg["grad_checkpoint"]:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "fine_tune_type": cfg["fine_tune_type"],
        "num_layers": num_layers,
        "lora_parameters": None if cfg["fine_tune_type"] == "full" else dict(cfg["lora_parameters"]),
        "trainable_parameters": int(trainable),
        "total_parameters": int(get_total_parameters(model)),
        "adapted_modules": adapted_modules(model),
    }


def adapted_modules(module):
    """The names, relative to module, of the modules with trainable weights under it
    ("model.layers.29.self_attn.q_proj" in the model, "self_attn.q_proj" in a block)."""
    from mlx.utils import tree_flatten

    return sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(module.trainable_parameters())})


def _add_lora(model, num_layers, cfg):
    """mlx-lm's LoRA (or DoRA) layers on the top blocks. mlx-lm passes over a `keys` name that
    matches no module: a misspelt key would train fewer modules (or none) without a word, so a
    key that adapted nothing is refused, by what mlx-lm did rather than a copy of its rules."""
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    params = dict(cfg["lora_parameters"])
    linear = (nn.Linear, nn.QuantizedLinear)
    names = sorted(k for k, m in model.layers[-1].named_modules() if isinstance(m, linear))
    hint = f"; a block's linear layers: {', '.join(names)}"
    try:
        linear_to_lora_layers(model, num_layers, params, use_dora=cfg["fine_tune_type"] == "dora")
    except ValueError as e:  # a key naming what LoRA cannot replace: "Can't convert ... Attention"
        raise ConfigError(f"lora_parameters: {e}{hint}") from None
    # a key names a module as mlx-lm matches it: within a block, or in the whole model
    blocks = model.layers[-max(num_layers, 0) :]
    adapted = {name for block in blocks for name in adapted_modules(block)}
    adapted |= set(adapted_modules(model))
    unknown = [k for k in params.get("keys") or () if k not in adapted]
    if unknown:
        raise ConfigError(
            f"lora_parameters.keys: {', '.join(map(repr, unknown))} names no layer LoRA can adapt "
            f"in the top {len(blocks)} blocks{hint}"
        )


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
