"""The method, as mlx-lm's tuner sets it up: adapters on the frozen base (add_adapters: LoRA,
DoRA or full weights of the top num_layers blocks), the optimizer with its learning-rate
schedule (make_optimizer, set_tree_leaves to put a checkpoint's state back). The loss is
train/loss.py's."""

from core import schedules
from core.config import ConfigError


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
        _check_keys(model, num_layers, cfg["lora_parameters"].get("keys"))
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


def _check_keys(model, num_layers, keys):
    """mlx-lm adapts the modules `keys` names and passes over a name that matches none: a
    misspelt key would train fewer modules (or none) without a word."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if keys is None:
        return
    types = (
        nn.Linear,
        nn.QuantizedLinear,
        nn.Embedding,
        nn.QuantizedEmbedding,
        SwitchLinear,
        QuantizedSwitchLinear,
    )
    adaptable = lambda m: hasattr(m, "to_lora") or isinstance(m, types)  # noqa: E731  (mlx-lm's own test)
    blocks = model.layers[-max(num_layers, 0) :]
    names = {k for b in blocks for k, m in b.named_modules() if adaptable(m)}
    names |= {k for k, m in model.named_modules() if adaptable(m)}
    unknown = [k for k in keys if k not in names]
    if unknown:
        in_block = sorted({k for k, m in model.layers[-1].named_modules() if adaptable(m)})
        raise ConfigError(
            f"lora_parameters.keys: {', '.join(map(repr, unknown))} names no layer LoRA can adapt "
            f"in the top {len(blocks)} blocks; a block's are: {', '.join(in_block)}"
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
