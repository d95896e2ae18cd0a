"""Learning-rate schedules, looked up by name (config key lr_schedule.name).

A schedule is a function (lr, iters, spec) -> a float, or a function of the optimizer's step
count (the updates done so far, an mx.array) giving the learning rate of the next update.
`spec` is the lr_schedule mapping (warmup, min_lr, warmup_init, ...). Adding one: write the
function here under @schedule("name") and a test in tests/test_train_units.py; the config
check and the error message list the registry's names.

An mlx-lm schedule ({name: cosine_decay, arguments: [...], warmup: N}, as mlx_lm.lora reads it)
is built by mlx-lm itself (build).
"""

import math

SCHEDULES = {}


def schedule(name):
    def register(fn):
        SCHEDULES[name] = fn
        return fn

    return register


def _warmup_then(decay, lr, spec):
    """Linear warmup over spec.warmup steps from spec.warmup_init to lr, then decay(t)."""
    import mlx.core as mx

    warmup = int(spec.get("warmup") or 0)
    warmup_init = float(spec.get("warmup_init") or 0.0)
    if warmup == 0:
        return lambda step: decay(step.astype(mx.float32))

    def fn(step):
        t = step.astype(mx.float32)
        return mx.where(t < warmup, warmup_init + (lr - warmup_init) * (t + 1) / warmup, decay(t))

    return fn


@schedule("constant")
def constant(lr, iters, spec):
    return lr


@schedule("cosine")
def cosine(lr, iters, spec):
    """Warmup, then cosine decay from lr to min_lr over the remaining steps."""
    import mlx.core as mx

    warmup, min_lr = int(spec.get("warmup") or 0), float(spec.get("min_lr") or 0.0)
    decay_steps = max(iters - warmup, 1)

    def decay(t):
        progress = mx.clip((t - warmup) / decay_steps, 0.0, 1.0)
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + mx.cos(math.pi * progress))

    return _warmup_then(decay, lr, spec)


@schedule("linear")
def linear(lr, iters, spec):
    """Warmup, then a straight line from lr to min_lr over the remaining steps."""
    import mlx.core as mx

    warmup, min_lr = int(spec.get("warmup") or 0), float(spec.get("min_lr") or 0.0)
    decay_steps = max(iters - warmup, 1)

    def decay(t):
        progress = mx.clip((t - warmup) / decay_steps, 0.0, 1.0)
        return lr + (min_lr - lr) * progress

    return _warmup_then(decay, lr, spec)


def build(cfg):
    """The optimizer's learning_rate for this config: a float or a schedule function."""
    lr, spec = float(cfg["learning_rate"]), cfg["lr_schedule"]
    if not spec:
        return lr
    if spec.get("arguments") is not None:  # an mlx-lm schedule, as mlx_lm.lora builds it
        from mlx_lm.tuner.utils import build_schedule

        return build_schedule(spec)
    return SCHEDULES[spec.get("name") or "constant"](lr, cfg["iters"], spec)
