"""train/frozen_blocks.py: a pass that starts from a batch's kept frozen bottom (the blocks below
the adapted ones) gives the full pass's loss and LoRA gradients to the bit, for the
conversations' loss and the replay's KL (with the base's hidden states kept too), on the toy
model, its 4-bit sibling (QLoRA, the 7B's path) and SmolLM2, with LoRA dropout drawing the same
masks; the kept output is what the pass uses; and it is off where it would not hold."""

import pytest
from test_loss import (
    KEPT_CASES,
    assert_same_step,
    kept_case,
    lora_model,
    loss_and_grads,
    padded_batch,
    replay_windows_of,
)

from train.frozen_blocks import FrozenBottom, first_adapted_block
from train.loss import ReplayLoss, TargetLoss


def batches_of(vocab):
    """Conversation batches (prompt and answer) and replay windows, one or several a batch."""
    from train.batches import collate

    windows = replay_windows_of(vocab)
    return [padded_batch(vocab, seed)[:2] for seed in (0, 1)] + [
        collate(windows, indices)[:2] for indices in ([0], [2, 0, 1])
    ]


def compare_kept_with_full_pass(model, vocab):

    full_loss, kept_loss = TargetLoss(model), TargetLoss(model, keep_frozen=True)
    assert kept_loss.frozen.on and kept_loss.frozen.frozen == first_adapted_block(model) > 0
    losses = [
        (full_loss, kept_loss),
        (ReplayLoss(full_loss, 2.5), ReplayLoss(kept_loss, 2.5, kept_bytes=1)),  # the base kept too
    ]
    model.train()
    for batch, lengths in batches_of(vocab):
        kept_loss.frozen.keep(model, batch[:, :-1])
        for full, kept in losses:
            if isinstance(kept, ReplayLoss):
                kept.keep_base(model, batch, lengths)  # its base pass starts from the kept bottom
            assert_same_step(model, full, kept, batch, lengths)
    frozen = kept_loss.frozen
    assert len(frozen.kept) == 4 and frozen.bytes == sum(h.nbytes for h in frozen.kept.values())
    batch, lengths = batches_of(vocab)[0]  # what is kept is what the pass uses: spoil it
    key = frozen.key(batch[:, :-1])
    frozen.kept[key] = frozen.kept[key] * 1.5
    assert (
        loss_and_grads(model, kept_loss, batch, lengths)[0]
        != loss_and_grads(model, full_loss, batch, lengths)[0]
    )


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_the_kept_bottom_equals_the_full_pass(request, case):
    compare_kept_with_full_pass(*kept_case(request, case))


def test_the_blocks_stand_back_after_a_pass(tiny_model):
    model = lora_model(tiny_model, spread=0.1)
    blocks = list(model.model.layers)
    frozen = FrozenBottom(model)
    batch, _ = batches_of(1000)[0]
    frozen.keep(model, batch[:, :-1])
    with pytest.raises(RuntimeError), frozen.reused(model, batch[:, :-1]):
        assert model.model.layers[0] is not blocks[0]
        raise RuntimeError("inside")
    assert all(a is b for a, b in zip(model.model.layers, blocks, strict=True))


def test_what_turns_it_off(tiny_model, monkeypatch):
    """Every block adapted, a trained embedding, a dropout in a frozen block, a body that does
    something between its blocks (the probe sees it), a budget of 0: nothing is kept."""
    import mlx.nn as nn
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.utils import load

    from train.method import add_adapters

    model = lora_model(tiny_model)
    assert first_adapted_block(model) == 2 and FrozenBottom(model).on  # 2 of the toy's 4 adapted
    assert not FrozenBottom(model, budget=0).on
    monkeypatch.setenv("TRAIN_KEEP_FROZEN_MB", "0")
    assert not TargetLoss(model, keep_frozen=True).frozen.on
    monkeypatch.setenv("TRAIN_KEEP_FROZEN_MB", "0.5")
    assert TargetLoss(model, keep_frozen=True).frozen.budget == 1 << 19
    model.model.embed_tokens.unfreeze()
    assert first_adapted_block(model) == 0 and not FrozenBottom(model).on
    model.model.embed_tokens.freeze()
    model.model.layers[0].dropout = nn.Dropout(p=0.1)
    assert not FrozenBottom(model).on
    del model.model.layers[0]["dropout"]
    assert FrozenBottom(model).on

    def scaled_between_blocks(self, inputs, cache=None, input_embeddings=None):
        h = self.embed_tokens(inputs)
        mask = create_attention_mask(h, None)
        for layer in self.layers:
            h = layer(h, mask, cache=None) * 1.5  # the kept bottom would be scaled twice
        return self.norm(h)

    with monkeypatch.context() as patch:
        patch.setattr(type(model.model), "__call__", scaled_between_blocks)
        assert first_adapted_block(model) == 2 and not FrozenBottom(model).on
    assert FrozenBottom(model).on

    whole, _ = load(str(tiny_model))
    cfg = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": 4, "scale": 10.0, "dropout": 0.0},
    }
    add_adapters(whole, {**cfg, "grad_checkpoint": False})
    assert first_adapted_block(whole) == 0 and not FrozenBottom(whole).on


def test_the_budget_stops_keeping_and_the_rest_runs_in_full(tiny_model):
    model = lora_model(tiny_model, spread=0.1)
    examples = batches_of(1000)
    first = FrozenBottom(model)
    first.keep(model, examples[0][0][:, :-1])
    size = first.bytes
    frozen = FrozenBottom(model, budget=size)  # room for the first batch only
    for batch, _ in examples:
        frozen.keep(model, batch[:, :-1])
    assert len(frozen.kept) == 1 and frozen.full and frozen.bytes == size
    batch, lengths = examples[1]  # not kept: its pass is the full one
    kept_loss = TargetLoss(model)
    kept_loss.frozen = frozen
    assert (
        loss_and_grads(model, kept_loss, batch, lengths)[0]
        == loss_and_grads(model, TargetLoss(model), batch, lengths)[0]
    )


def test_batch_size_auto_plans_for_what_is_kept(tiny_model, tiny_model_4bit, monkeypatch):
    """planned_bytes: every target token's hidden state in what the blocks give out (float32 on
    both toys: the 4-bit one's scales are float32), up to the budget; 0 where nothing is kept."""
    from train.frozen_blocks import planned_bytes

    examples = replay_windows_of(1000)  # 33 + 20 + 27 tokens
    for path in (tiny_model, tiny_model_4bit):
        model = lora_model(path)
        assert planned_bytes(model, examples) == (32 + 19 + 26) * model.args.hidden_size * 4
        monkeypatch.setenv("TRAIN_KEEP_FROZEN_MB", str(1000 / 2**20))
        assert planned_bytes(model, examples) == 1000
        monkeypatch.setenv("TRAIN_KEEP_FROZEN_MB", "0")
        assert planned_bytes(model, examples) == 0
        monkeypatch.delenv("TRAIN_KEEP_FROZEN_MB")
    model.model.embed_tokens.unfreeze()
    assert planned_bytes(model, examples) == 0
