"""The frozen bottom of the model: the blocks below the lowest adapted one, whose output for a
batch is the same at every step, kept after its first pass.

LoRA on the top N blocks (num_layers) leaves the embedding and the blocks below them frozen,
without dropout: their output for a batch of tokens never changes during a run. Batches recur
(the same batches every epoch, in another order, train/batches.py; the replay windows every
few steps, train/replay.py), so FrozenBottom.keep runs them once per batch, outside the
gradient, and `reused` makes the body's later passes over that batch start from the kept
output: the bottom blocks stand aside (their input handed on) and the last one hands on what
was kept. The body's own loop still runs (its masks, its sliding windows), so the blocks above
see exactly what a full pass feeds them: the same computation on the same shapes, and the same
numbers to the bit. On the demo (16 of SmolLM2's 30 blocks adapted, 14 frozen) a step of a
batch met before takes 1/1.30 of the time, and the whole training 9% less (docs/PERFORMANCE.md).

Taken only where it holds: a trained embedding or a dropout in a frozen block turns it off, and
a probe must give the body's full pass to the bit, else the model has something between its
blocks this does not know of. Kept up to MAX_BYTES (TRAIN_KEEP_FROZEN_MB overrides, 0 turns it
off), which batch_size auto plans for (planned_bytes, docs/MEMORY.md); past it, later batches
run in full."""

import os
from contextlib import contextmanager, nullcontext

import numpy as np

MAX_BYTES = 256 << 20
PROBE = [[5, 9, 2, 7, 3, 8, 4, 6, 11, 10, 12, 13], [7, 3, 5, 9, 2, 8, 6, 4, 13, 12, 11, 10]]


def budget_bytes():
    """MAX_BYTES, or TRAIN_KEEP_FROZEN_MB's megabytes where it is set."""
    given = os.environ.get("TRAIN_KEEP_FROZEN_MB", "").strip()
    return int(float(given) * (1 << 20)) if given else MAX_BYTES


def first_adapted_block(model):
    """The index of the lowest block with a trainable parameter: the count of frozen blocks
    below it. 0 where there is nothing to keep: the body is not `model.layers`, the embedding
    trains, or every block does."""
    from mlx.utils import tree_flatten

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, list) or not layers:
        return 0
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    if any(name.startswith("model.embed_tokens") for name in names):
        return 0
    blocks = [int(name.split(".")[2]) for name in names if name.startswith("model.layers.")]
    return min(blocks) if blocks else 0


def planned_bytes(model, examples):
    """What keeping these examples' bottom may take, unpadded, up to the budget: batch_size
    auto plans for it. 0 where nothing would be kept or the model's width is unknown."""
    width = getattr(getattr(model, "args", None), "hidden_size", None)
    if budget_bytes() <= 0 or not width or not first_adapted_block(model):
        return 0
    embedding = model.model.embed_tokens
    dtype = getattr(embedding, "scales", embedding.weight).dtype  # quantized: what it gives out
    tokens = sum(max(len(ids) - 1, 0) for ids, _ in examples)
    return min(budget_bytes(), tokens * int(width) * dtype.size)


def has_dropout(blocks):
    import mlx.nn as nn

    return any(isinstance(m, nn.Dropout) for block in blocks for _, m in block.named_modules())


class StandIn:
    """A frozen block during a pass: hands on its input, or `out` where given; its attributes
    are the block's (a body's loop may read them, as mlx-lm's llama reads use_sliding)."""

    def __init__(self, block, out=None, seen=None):
        self._block, self._out, self._seen = block, out, seen

    def __getattr__(self, name):
        return getattr(self._block, name)

    def __call__(self, h, *args, **kwargs):
        if self._seen is not None:
            self._seen.append(h)
        return h if self._out is None else self._out


@contextmanager
def standing_in(layers, stand_ins):
    """layers[i] replaced by stand_ins[i] for each i given, put back on the way out."""
    saved = {i: layers[i] for i in stand_ins}
    try:
        for i, stand_in in stand_ins.items():
            layers[i] = stand_in
        yield
    finally:
        for i, block in saved.items():
            layers[i] = block


class FrozenBottom:
    """The frozen blocks' output of each batch met, keyed by its tokens (see the module)."""

    def __init__(self, model, budget=None):
        self.budget = budget_bytes() if budget is None else budget
        self.kept, self.bytes, self.full = {}, 0, False
        self.frozen = first_adapted_block(model) if self.budget > 0 else 0
        layers = model.model.layers if self.frozen else []
        if self.frozen and (has_dropout(layers[: self.frozen]) or not self.reproduces(model)):
            self.frozen = 0

    @property
    def on(self):
        return self.frozen > 0

    def bottom(self, model, inputs):
        """The frozen blocks' output for these inputs: the body run with the blocks above them
        standing aside, the input of the lowest adapted block recorded."""
        seen, layers = [], model.model.layers
        above = {
            i: StandIn(layers[i], seen=seen if i == self.frozen else None)
            for i in range(self.frozen, len(layers))
        }
        with standing_in(layers, above):
            model.model(inputs)
        return seen[0]

    def reused(self, model, inputs):
        """Inside: a pass of the body over these inputs starts from their kept bottom, if kept."""
        kept = self.kept.get(self.key(inputs)) if self.kept else None
        return nullcontext() if kept is None else self.starting_from(model, kept)

    def starting_from(self, model, bottom):
        """Inside: a pass of the body starts from this output of the frozen blocks."""
        layers = model.model.layers
        below = {
            i: StandIn(layers[i], out=bottom if i == self.frozen - 1 else None) for i in range(self.frozen)
        }
        return standing_in(layers, below)

    def keep(self, model, inputs):
        """Outside the gradient, before a step: these inputs' bottom, if on, not kept yet and
        within the budget (once past it, no more is kept)."""
        import mlx.core as mx

        key = self.key(inputs) if self.on and not self.full else None
        if key is None or key in self.kept:
            return
        hidden = mx.stop_gradient(self.bottom(model, inputs))
        mx.eval(hidden)
        if self.bytes + hidden.nbytes > self.budget:
            self.full = True
            return
        self.kept[key], self.bytes = hidden, self.bytes + hidden.nbytes

    @staticmethod
    def key(inputs):
        return np.asarray(inputs, np.int32).tobytes() + bytes(str(inputs.shape), "ascii")

    def reproduces(self, model):
        """Whether a pass from the kept bottom gives the body's full pass to the bit, on a probe."""
        import mlx.core as mx

        probe = mx.array(PROBE)
        was_training = model.training
        model.eval()
        try:
            full = model.model(probe)
            with self.starting_from(model, self.bottom(model, probe)):
                again = model.model(probe)
            return full.shape == again.shape and mx.array_equal(full, again).item()
        except (AttributeError, TypeError, ValueError, IndexError):
            return False
        finally:
            model.train(was_training)
