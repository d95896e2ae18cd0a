"""Replay: raw text on which training holds the model's next-token predictions to the base's.

Fine-tuning on a club's questions and answers moves the model's whole output distribution, not
only its answers: on SmolLM2-135M the demo's adapter raised the perplexity of ordinary prose
(data/general/, the forgetting check of `make eval`) from 50 to 264. Training on the base's own
sampled text as ordinary targets lowered it less than holding the whole distribution
(docs/RECIPES.md, the r rows): so a replay batch's loss is the KL divergence from the base
model's next-token distribution to the adapted one's at every position of the text
(loss.ReplayLoss), the base's computed by the same model with its LoRA adapters switched off,
so no second copy of the model is held in memory.

Config: `replay: {data: PATH, weight: W, per_step: K, repeat: N}`. PATH is a .txt file or a
folder of them (sorted by name); it must not be the text `make eval` measures forgetting on, or
that measure says nothing. W scales the KL per token. Its windows of WINDOW tokens reach
training in one of two ways:
- per_step K >= 1 (the default, 1): K windows in every step (windows_at), their KL x W added
  to the step's loss beside the conversations' cross-entropy. The adapters never go many steps
  unchecked.
- per_step 0: the windows are batched like the conversations and join every epoch as batches
  of their own (Trainer), so the share of replay steps is the share of replay batches, and N
  (default 1) puts each window N times in an epoch.
On SmolLM2 the demo's recipe with replay batches (4 of an epoch's 116, weight 8) went up to 80
steps without one; the KL at a replay batch was 0.6-1.8 per token, and 3 seeds of 4 forgot past
the limit of `make eval` (+21.6% to +43.1%; twice as often, N 2, held it at all four: the s and v
rows of docs/RECIPES.md). One window in every step at weight 1 kept the KL at 0.02-0.3 and the
general text within 1% of the base at all four seeds, and answered a median of 28.5 of the 58
paraphrases against 25.5 (the q rows).

The base never changes: where the replay text is small and its batches repeat (per_step 1 or
0), loss.ReplayLoss keeps the base's hidden states at a batch's targets after its first step
(kept_bytes, keep_base), and the batch's later steps run only the output layer for the base."""

import hashlib
from dataclasses import dataclass
from pathlib import Path

from core.config import REPLAY_WINDOW as WINDOW  # tokens per replay window
from train import batches


@dataclass
class ReplayText:
    """The replay files: (name, text) each, and what identifies them (for the fingerprint)."""

    path: str
    texts: list
    sha256: str

    @property
    def info(self):
        return {"path": self.path, "sha256": self.sha256, "count": len(self.texts)}


def read_replay(path):
    """The .txt file at path, or every *.txt in the folder; ValueError naming the path when
    there is none or one is not UTF-8 text."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        what = "no *.txt file in the folder" if path.is_dir() else "no such file or folder"
        raise ValueError(f"replay.data {path}: {what}")
    digest, texts = hashlib.sha256(), []
    for f in files:
        raw = f.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text (byte {e.start})") from None
        digest.update(f.name.encode() + b"\0" + hashlib.sha256(raw).digest())
        texts.append((f.name, text))
    return ReplayText(str(path), texts, digest.hexdigest())


ORDER_SEED = 7919  # the windows' order is seeded apart from the batches' (seed + this)


def windows_at(step, per_step, n_windows, seed):
    """The indices of step's per_step windows (steps count from 1): all the windows in a seeded
    order, a new order each pass, taken per_step at a time. A function of the step alone, so a
    resumed run takes the same windows as an uninterrupted one with nothing saved."""
    first = (step - 1) * per_step
    return [
        batches.epoch_order(seed + ORDER_SEED, pos // n_windows, n_windows)[pos % n_windows]
        for pos in range(first, first + per_step)
    ]


def replay_windows(tokenizer, replay):
    """[(ids, 0)]: every token of the replay text but a window's first is a target."""
    return batches.text_windows(tokenizer, [text for _, text in replay.texts], WINDOW)


def kept_bytes(model, windows, per_step):
    """What the base's hidden states at every target of these windows take, float32, for
    loss.ReplayLoss to keep where that is small. None where nothing is worth keeping: no windows,
    the model's width unknown, or per_step K > 1 (the K windows of a step are another set at each
    pass, so a batch never comes again; K = 1 and replay batches repeat every pass)."""
    width = getattr(getattr(model, "args", None), "hidden_size", None)
    if not width or not windows or per_step > 1:
        return None
    return 4 * int(width) * sum(max(len(ids) - 1, 0) for ids, _ in windows)
