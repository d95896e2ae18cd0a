"""The batch size a run trains with, per process (choose_batch_size): the config's number
(checked against the memory model), the one a resumed run chose, or, with batch_size auto,
the largest that fits memory (probe_batch_size: core.memory's estimate, then a measured
probe of the longest conversations and of the replay windows, if any; the processes on one
machine share its memory and the run takes the smallest choice). Never more than the
training set allows."""

from core import memory
from train import batches, frozen_blocks
from train.exits import EXIT_CONFIG, Stop


def choose_batch_size(cfg, inputs, start, dist):
    """Per process: the config's, the one a resumed run chose, or probed (auto); at most
    what the training set allows."""
    log = dist.log
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
        batch_size = probe_batch_size(cfg, inputs, dist)
    else:
        batch_size = int(cfg["batch_size"])
        memory.check_fixed_batch_size(
            inputs.model, cfg, batch_size, inputs.train_set, cfg["auto_batch"]["memory_fraction"], log=log
        )
    if batch_size * dist.size > n_train:
        if dist.size == 1:
            log(
                f"note: batch_size {batch_size} is more than the {n_train} training examples; using {n_train}"
            )
        else:
            log(
                f"note: batch_size {batch_size} x {dist.size} processes is more than the "
                f"{n_train} training examples; using {max(1, n_train // dist.size)} per process"
            )
        batch_size = max(1, n_train // dist.size)
    return batch_size


def probe_batch_size(cfg, inputs, dist):
    """The largest batch that fits memory. Every process probes at once; those on one machine
    share its memory. The run takes the smallest choice, so it fits everywhere."""
    import mlx.nn as nn

    from train.loss import ReplayLoss, TargetLoss

    model = inputs.model
    extra = memory.optimizer_state_bytes(model, str(cfg["optimizer"]).lower())
    extra += frozen_blocks.planned_bytes(model, inputs.train_set + inputs.replay_set)  # loss.py keeps
    max_batch_size = cfg["auto_batch"]["max_batch_size"]
    memory_fraction = cfg["auto_batch"]["memory_fraction"]
    if dist.size > 1:
        hosts = [h for (h,) in dist.all_gather_ints([dist.host_id()])]
        here = hosts.count(dist.host_id())
        memory_fraction /= here
        max_batch_size = max(1, min(max_batch_size, len(inputs.train_set) // dist.size))
    target_loss = TargetLoss(model)  # checks the model's output split once (a forward pass)
    replay = None
    if inputs.replay_set:  # a replay pass also holds the base model's logits: probe one too
        replay_loss = ReplayLoss(target_loss, cfg["replay"]["weight"])
        loss_and_grad = nn.value_and_grad(model, replay_loss.mean_loss)
        replay = (loss_and_grad, inputs.replay_set, cfg["replay"]["per_step"])
    try:
        batch_size, why = memory.auto_batch_size(
            model,
            nn.value_and_grad(model, target_loss.mean_loss),
            inputs.train_set,
            batches.collate,
            cfg,
            max_batch_size=max_batch_size,
            memory_fraction=memory_fraction,
            extra_bytes=extra,
            log=dist.log,
            replay=replay,
        )
    except memory.DoesNotFit as e:
        raise Stop(str(e), EXIT_CONFIG) from None
    if dist.size > 1:
        chosen = [b for (b,) in dist.all_gather_ints([batch_size])]
        batch_size = min(chosen)
        why = (
            f"per process; {here} of the {dist.size} processes share this machine's memory, "
            f"the smallest of the processes' choices {chosen}; rank 0: {why}"
        )
    dist.log(f"batch_size auto: {batch_size} ({why})")
    return batch_size
