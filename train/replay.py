"""Replay: raw text on which training holds the model's next-token predictions to the base's.

Fine-tuning on a club's questions and answers moves the model's whole output distribution, not
only its answers: on SmolLM2-135M the demo's adapter raised the perplexity of ordinary prose
(data/general/, the forgetting check of `make eval`) from 50 to 264. Training on the base's own
sampled text as ordinary targets lowered it less than holding the whole distribution
(docs/RECIPES.md, the r rows): so a replay batch's loss is the KL divergence from the base
model's next-token distribution to the adapted one's at every position of the text
(loss.ReplayLoss), the base's computed by the same model with its LoRA adapters switched off,
so no second copy of the model is held in memory.

Config: `replay: {data: PATH, weight: W, repeat: N}`. PATH is a .txt file or a folder of them
(sorted by name); it must not be the text `make eval` measures forgetting on, or that measure
says nothing. Its windows of WINDOW tokens are batched like the conversations and join every epoch
as batches of their own (Trainer), so the share of replay steps is the share of replay
batches; W scales the KL per token, and N (default 1) puts each window N times in an epoch: more
replay steps, each as strong (on gemma-3-270m twice as often at half the weight forgot less than
once at the full weight, docs/RECIPES.md g13; on SmolLM2 it moved along the weight's line, n8,
and twice as often at the full weight held the forgetting limit at four seeds of four where once
held it at one, the s and v rows)."""

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


def replay_windows(tokenizer, replay):
    """[(ids, 0)]: every token of the replay text but a window's first is a target."""
    return batches.text_windows(tokenizer, [text for _, text in replay.texts], WINDOW)
