"""train/loss.py: the loss with the output layer at the targets only equals mlx-lm's
default_loss (value and LoRA gradients) on the toy model (untied output layer), its 4-bit
sibling and SmolLM2 (tied, a real LLM), and falls back to every logit where the model's
output is not head(body(x)). The replay loss (KL from the base model, taken by switching the
adapters off) equals the KL computed from a separately loaded base model, in value (numpy,
float64) and LoRA gradients, on the same three models."""

import random

import numpy as np
import pytest

from train.loss import ReplayLoss, TargetLoss, adapters_off, lora_modules, target_rows


def mask_rows(lengths, width):
    """default_loss's own mask (mlx_lm/tuner/trainer.py), flattened: the independent reference."""
    steps = np.arange(1, width + 1)
    lengths = np.asarray(lengths)
    mask = (steps >= lengths[:, 0:1]) & (steps <= lengths[:, 1:])
    return np.flatnonzero(mask.ravel())


def test_target_rows_are_the_rows_default_loss_masks_in():
    rng = random.Random(0)
    for _ in range(300):
        width = rng.randint(1, 40)
        lengths = []
        for _ in range(rng.randint(1, 6)):
            last = rng.randint(1, width)  # collate: len(ids) - 1, at most the targets' width
            lengths.append((rng.randint(0, last), last))
        assert target_rows(lengths, width).tolist() == mask_rows(lengths, width).tolist()


def padded_batch(vocab, seed=0):
    """Four rows of different lengths, prompts of different lengths (offset 0 on one), padded
    with 0 as collate pads."""
    from train.batches import collate

    rng = np.random.default_rng(seed)
    examples = [
        (rng.integers(3, vocab, n).tolist(), offset) for n, offset in ((37, 20), (12, 0), (25, 24), (30, 9))
    ]
    return collate(examples, range(len(examples)))


def lora_model(path, randomize=True, spread=0.02):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load

    from train.method import add_adapters

    model, _ = load(str(path))
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
        "grad_checkpoint": False,
    }
    add_adapters(model, cfg)
    if not randomize:
        return model
    # LoRA's B starts at zero: random values, so that the adapters change the logits
    params = tree_flatten(model.trainable_parameters())
    mx.random.seed(1)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * spread) for k, v in params]))
    return model


def compare_with_default_loss(model, vocab):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss

    batch, lengths, _ = padded_batch(vocab)
    ours = TargetLoss(model)
    (mean, n) = ours.mean_loss(model, batch, lengths)
    (ref_mean, ref_n) = default_loss(model, batch, lengths)
    assert n.item() == ref_n.item() == 17 + 11 + 1 + 21  # targets: max(offset, 1) .. len - 1
    assert mean.item() == pytest.approx(ref_mean.item(), rel=1e-5)

    (_, total), grads = nn.value_and_grad(model, ours.sum_loss)(model, batch, lengths, float(n.item()))
    _, ref_grads = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    assert total.item() == pytest.approx(ref_mean.item() * ref_n.item(), rel=1e-5)
    ref = dict(tree_flatten(ref_grads))
    for key, g in tree_flatten(grads):
        scale = float(mx.abs(ref[key]).max().item())
        assert scale > 0, key
        assert float(mx.abs(g - ref[key]).max().item()) <= 1e-4 * scale, key
    return ours


def test_equals_default_loss_on_the_toy_model(tiny_model):
    model = lora_model(tiny_model)
    assert "lm_head" in model  # the untied output layer
    assert compare_with_default_loss(model, 1000).targets_only


def test_equals_default_loss_on_the_4bit_toy_model(tiny_model_4bit):
    assert compare_with_default_loss(lora_model(tiny_model_4bit), 1000).targets_only


def test_equals_default_loss_on_smollm2(smollm_model):
    model = lora_model(smollm_model)
    assert "lm_head" not in model  # tied: the embedding's as_linear is the output layer
    assert compare_with_default_loss(model, 49152).targets_only


def test_a_model_with_something_after_the_output_layer_gets_every_logit(tiny_model):
    """A soft cap after the output layer (as Gemma 2 has): the split would change the logits,
    so the probe refuses it and the loss is still default_loss's."""
    import mlx.core as mx

    model = lora_model(tiny_model)
    base_class = type(model)

    class SoftCapped(base_class):
        def __call__(self, inputs, *args, **kwargs):
            return 5.0 * mx.tanh(base_class.__call__(self, inputs, *args, **kwargs) / 5.0)

    model.__class__ = SoftCapped
    assert not compare_with_default_loss(model, 1000).targets_only


# --------------------------------------------------------------------------- the replay loss


def base_logits(path, batch):
    """The base model's logits, from its own copy loaded without adapters: the reference."""
    import mlx.core as mx
    from mlx_lm.utils import load

    base, _ = load(str(path))
    return np.array(base(batch[:, :-1]).astype(mx.float32))


def kl_rows(base, tuned, rows):
    """KL(base || tuned) of each row, float64 numpy."""

    def log_softmax(x):
        x = x.reshape(-1, x.shape[-1])[rows].astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(base), log_softmax(tuned)
    return (np.exp(p) * (p - q)).sum(axis=-1)


def compare_with_separate_base(path, vocab):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model = lora_model(path, spread=0.1)  # a KL well above float32's rounding
    batch, lengths, _ = padded_batch(vocab)
    rows = mask_rows(np.array(lengths), batch.shape[1] - 1)
    base = base_logits(path, batch)
    before = np.array(model(batch[:, :-1]))
    replay = ReplayLoss(TargetLoss(model), weight=2.5)
    ours = np.array(replay.token_losses(model, batch, lengths))
    ref = kl_rows(base, before, rows)
    assert ref.mean() > 1e-2  # the adapters do move the distribution
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-5)
    assert np.array_equal(np.array(model(batch[:, :-1])), before)  # the adapters are back on

    def reference(model, batch, lengths, count):  # the base's logits as constants
        logits = model(batch[:, :-1]).astype(mx.float32)
        q = nn.log_softmax(logits.reshape(-1, logits.shape[-1])[mx.array(rows)], axis=-1)
        p = nn.log_softmax(mx.array(base).reshape(-1, base.shape[-1])[mx.array(rows)], axis=-1)
        return 2.5 * (mx.exp(p) * (p - q)).sum() / count

    n = float(len(rows))
    (weighted, total), grads = nn.value_and_grad(model, replay.sum_loss)(model, batch, lengths, n)
    _, ref_grads = nn.value_and_grad(model, reference)(model, batch, lengths, n)
    assert total.item() == pytest.approx(ref.sum(), rel=2e-3)  # reported unweighted
    assert weighted.item() == pytest.approx(2.5 * ref.sum() / n, rel=2e-3)
    mean, count = replay.mean_loss(model, batch, lengths)  # the batch-size probe's, one batch alone
    assert count.item() == len(rows) and mean.item() == pytest.approx(2.5 * ref.mean(), rel=2e-3)
    expected = dict(tree_flatten(ref_grads))
    for key, g in tree_flatten(grads):
        scale = float(mx.abs(expected[key]).max().item())
        assert scale > 0, key
        assert float(mx.abs(g - expected[key]).max().item()) <= 2e-3 * scale, key


def test_replay_kl_equals_a_separate_base_models_on_the_toy_model(tiny_model):
    compare_with_separate_base(tiny_model, 1000)


def test_replay_kl_equals_a_separate_base_models_on_the_4bit_toy_model(tiny_model_4bit):
    compare_with_separate_base(tiny_model_4bit, 1000)


def test_replay_kl_equals_a_separate_base_models_on_smollm2(smollm_model):
    compare_with_separate_base(smollm_model, 49152)


def test_replay_kl_is_zero_with_fresh_adapters_and_the_scales_come_back(tiny_model):
    model = lora_model(tiny_model, randomize=False)
    scales = [m.scale for m in lora_modules(model)]
    assert len(scales) == 2 * 7 and set(scales) == {10.0}  # 7 linear layers in each of 2 blocks
    batch, lengths, _ = padded_batch(1000)
    assert (
        np.abs(np.array(ReplayLoss(TargetLoss(model), 1.0).token_losses(model, batch, lengths))).max() < 1e-6
    )
    with pytest.raises(RuntimeError):
        with adapters_off(model):
            assert {m.scale for m in lora_modules(model)} == {0.0}
            raise RuntimeError("inside")
    assert [m.scale for m in lora_modules(model)] == scales


# --------------------------------------------------------------------------- the base kept


def replay_windows_of(vocab):
    """Three raw-text windows of different lengths, every token but the first a target."""
    rng = np.random.default_rng(3)
    return [(rng.integers(3, vocab, n).tolist(), 0) for n in (33, 20, 27)]


def loss_and_grads(model, loss, batch, lengths):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    n = float(len(target_rows(lengths, batch.shape[1] - 1)))
    (weighted, total), grads = nn.value_and_grad(model, loss.sum_loss)(model, batch, lengths, n)
    mx.eval(weighted, total, grads)
    return total.item(), {k: np.array(g) for k, g in tree_flatten(grads)}


def assert_same_step(model, full, kept, batch, lengths):
    """The two losses give the same value and LoRA gradients to the bit, and leave the random
    stream where the other left it (the same dropout masks after them)."""
    import mlx.core as mx

    mx.random.seed(7)
    total, grads = loss_and_grads(model, full, batch, lengths)
    after_full = np.array(mx.random.uniform(shape=(4,)))
    mx.random.seed(7)
    kept_total, kept_grads = loss_and_grads(model, kept, batch, lengths)
    assert np.array_equal(np.array(mx.random.uniform(shape=(4,))), after_full)
    assert kept_total == total > 1e-2
    assert all(np.array_equal(kept_grads[k], g) for k, g in grads.items())


def compare_kept_with_full_base(model, vocab):
    """A batch's base hidden states kept (ReplayLoss.keep_base) give the KL and gradients of
    the base's full pass to the bit, one window a batch (the demo's replay.per_step 1) or several
    padded together (replay batches), and with LoRA dropout on: the base's pass, kept or not,
    draws no random numbers, so the adapted pass gets the same dropout masks."""
    import mlx.core as mx

    from train.batches import collate

    examples = replay_windows_of(vocab)
    full = ReplayLoss(TargetLoss(model), 2.5)
    kept = ReplayLoss(TargetLoss(model), 2.5, kept_bytes=1)
    assert full.kept is None and kept.kept == {}
    model.train()  # as the trainer's: the base's pass turns dropout off, then back on
    for indices in ([0], [1], [2], [2, 0, 1]):
        batch, lengths, _ = collate(examples, indices)
        kept.keep_base(model, batch, lengths)
        assert model.training
        assert_same_step(model, full, kept, batch, lengths)
    assert len(kept.kept) == 4
    key = next(iter(kept.kept))  # the kept states are what the loss uses: spoil one, the KL moves
    kept.kept[key] = mx.zeros_like(kept.kept[key])
    batch, lengths, _ = collate(examples, [0])
    assert loss_and_grads(model, kept, batch, lengths)[0] != loss_and_grads(model, full, batch, lengths)[0]


# the models a kept pass is checked on: fixture, vocabulary, LoRA dropout on
KEPT_CASES = {
    "toy": ("tiny_model", 1000, False),
    "4-bit toy": ("tiny_model_4bit", 1000, False),  # QLoRA, as the 7B's
    "smollm2": ("smollm_model", 49152, False),
    "toy with LoRA dropout": ("tiny_model", 1000, True),
}


def kept_case(request, case):
    """(model with random adapters, vocabulary) of a KEPT_CASES entry."""
    import mlx.nn as nn

    fixture, vocab, dropout = KEPT_CASES[case]
    model = lora_model(request.getfixturevalue(fixture), spread=0.1)
    for m in lora_modules(model) if dropout else []:
        m.dropout = nn.Dropout(p=0.5)
    return model, vocab


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_the_base_kept_equals_its_full_pass(request, case):
    compare_kept_with_full_base(*kept_case(request, case))


def test_what_is_kept_and_when(tiny_model):
    """replay.kept_bytes counts the targets' hidden states; nothing is kept past MAX_KEPT_BYTES,
    for K > 1 windows a step (never the same batch again), or where the output layer is not split
    off (the full logits would be what to keep)."""
    from train import replay
    from train.loss import MAX_KEPT_BYTES

    model = lora_model(tiny_model)
    examples = replay_windows_of(1000)
    assert replay.kept_bytes(model, examples, 1) == 4 * model.args.hidden_size * (32 + 19 + 26)
    assert replay.kept_bytes(model, examples, 0) == replay.kept_bytes(model, examples, 1)
    assert replay.kept_bytes(model, examples, 2) is None and replay.kept_bytes(model, [], 1) is None
    assert ReplayLoss(TargetLoss(model), 1.0, MAX_KEPT_BYTES).kept == {}
    assert ReplayLoss(TargetLoss(model), 1.0, MAX_KEPT_BYTES + 1).kept is None
    capped = TargetLoss(model)
    capped.targets_only = False
    assert ReplayLoss(capped, 1.0, 1).kept is None
