"""Examples, batches and their order: the data side of the training loop.

Conversations become (ids, prompt_len) through core.prompt.encode_examples, the same
rendering the worker's prompts go through (one example per conversation, or one per assistant
turn with train_on: all_assistant). Batches follow mlx-lm's iterate_batches: examples
sorted by length, cut into batches (the last, shorter one included, so no example is left
out), padded, with lengths as (offset, length) for mlx-lm's default_loss. The order of the
batches is a permutation per epoch drawn from (seed, epoch) alone, so the position in the
data is two integers and a resumed run sees exactly the batches an uninterrupted one would.

In a run of several processes (train.launch) the batches are those of the global batch size
(processes x batch_size) and process r takes examples r, r+k, r+2k... of each (shard); the
losses are summed and divided by the target count of the whole batch (target_count), so k
processes see, and average over, exactly what one process with k x batch_size would.
"""

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from core.prompt import PromptError, encode_examples
from train.checkpoint import sha256_file


@dataclass
class Split:
    """One data file: its conversations and what identifies it."""

    path: str
    conversations: list
    sha256: str
    lines: list = field(default_factory=list)  # the file's line number of each conversation
    noised: int = 0  # the last conversations: noised copies of the file's (question_noise.py)

    def where(self, i):
        return f"{self.path}:{self.lines[i]}" if i < len(self.lines) else f"{self.path}: conversation {i + 1}"

    @property
    def info(self):
        info = {"path": self.path, "sha256": self.sha256, "count": len(self.conversations) - self.noised}
        return {**info, "noised": self.noised} if self.noised else info


def read_split(path):
    """A {"messages": [...]} JSONL file (prepare_data's output); a missing file is empty."""
    path = Path(path)
    if not path.is_file():
        return Split(str(path), [], None)
    conversations, lines = [], []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            messages = record["messages"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(
                f'{path}:{number}: not a {{"messages": [...]}} record ({e}); '
                "run `make data` to prepare the data"
            ) from None
        conversations.append(messages)
        lines.append(number)
    return Split(str(path), conversations, sha256_file(path), lines)


def common_system_prompt(conversations):
    """The system message every conversation starts with, if they all share one."""
    prompts = {m[0]["content"] if m and m[0]["role"] == "system" else None for m in conversations}
    return prompts.pop() if len(prompts) == 1 else None


@dataclass
class Encoded:
    examples: list  # [(ids, offset)]
    truncated: int = 0
    dropped: int = 0
    notes: list = field(default_factory=list)


def encode(tokenizer, conversations, system_prompt, mask_prompt, max_seq_length, train_on="last", where=None):
    """Token ids and loss offsets. Over-long examples are cut to max_seq_length; one left
    with no answer token to learn from is dropped (both counted). A conversation the chat
    template cannot encode consistently stops with ValueError naming where(i) (file:line)."""
    out = Encoded([])
    for i, messages in enumerate(conversations):
        try:
            pairs = encode_examples(tokenizer, messages, system_prompt, train_on)
        except PromptError as e:
            place = where(i) if where else f"conversation {i + 1}"
            raise ValueError(f"{place}: {e}") from None
        for ids, prompt_len in pairs:
            _add_example(out, ids, prompt_len, mask_prompt, max_seq_length)
    return out


def _add_example(out, ids, prompt_len, mask_prompt, max_seq_length):
    if len(ids) > max_seq_length:
        ids = ids[:max_seq_length]
        out.truncated += 1
    offset = prompt_len if mask_prompt else 0
    if len(ids) - max(offset, 1) < 1:
        out.dropped += 1
        return
    out.examples.append((ids, offset))


def text_windows(tokenizer, texts, window):
    """Raw text as examples: each text's tokens cut into windows of at most `window` tokens,
    every token but a window's first a target: [(ids, 0)].

    A tokenizer that starts a text with its own start token (Mistral's <s>, Gemma's <bos>)
    gets it at the head of every window, not only the first: a model trained always to see it
    at position 0 is measured as it runs, and each of the text's tokens is a target exactly
    once. One without (SmolLM2's byte-level BPE) gets plain consecutive windows."""
    examples = []
    for text in texts:
        ids = tokenizer.encode(text)
        start = ids[:1] if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else []
        ids, step = ids[len(start) :], window - len(start)
        chunks = [start + ids[i : i + step] for i in range(0, len(ids), step)]
        examples += [(chunk, 0) for chunk in chunks if len(chunk) > 1]
    return examples


def examples_sha256(*example_sets):
    """One hash of encoded example sets, token for token and offset for offset."""
    digest = hashlib.sha256()
    for examples in example_sets:
        rows = [[[int(t) for t in ids], int(offset)] for ids, offset in examples]
        digest.update(orjson.dumps(rows) + b"\n")
    return digest.hexdigest()


def make_batches(examples, batch_size):
    """Example indices grouped into batches of similar length (shortest first)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard(indices, rank, size):
    """Process `rank`'s share of a batch: its examples rank, rank+size, ... (all if size 1)."""
    return indices[rank::size] if size > 1 else indices


def target_count(examples, indices):
    """The loss targets of these examples, as default_loss counts them with collate's
    lengths: positions max(offset, 1) .. len(ids) - 1."""
    return sum(len(examples[i][0]) - max(examples[i][1], 1) for i in indices)


def token_count(examples, indices):
    return sum(len(examples[i][0]) for i in indices)


def collate(examples, indices, pad_id=0):
    """(batch, lengths, n_tokens) for mlx-lm's default_loss.

    default_loss counts a target at position t (the token at index t) when
    offset <= t <= length; with length = len(ids) it would also train the first padding
    token after the end of the sequence, so we pass len(ids) - 1: the targets are exactly
    the sequence's own tokens from `offset` on (the answer and its end-of-sequence token).
    """
    import mlx.core as mx

    rows = [examples[i] for i in indices]
    width = max(len(ids) for ids, _ in rows)
    arr = np.full((len(rows), width), pad_id, np.int32)
    lengths = np.zeros((len(rows), 2), np.int32)
    for r, (ids, offset) in enumerate(rows):
        arr[r, : len(ids)] = ids
        lengths[r] = (offset, len(ids) - 1)
    return mx.array(arr), mx.array(lengths), sum(len(ids) for ids, _ in rows)


def epoch_order(seed, epoch, n_batches):
    """The shuffled batch order of one epoch: a function of (seed, epoch) only."""
    return [int(i) for i in np.random.default_rng([int(seed), int(epoch)]).permutation(n_batches)]


class BatchOrder:
    """Where the training loop is in the data: epoch, index into that epoch's order."""

    def __init__(self, n_batches, seed, epoch=0, index=0):
        self.n_batches, self.seed, self.epoch, self.index = n_batches, seed, epoch, index
        self.order = epoch_order(seed, epoch, n_batches)

    def next(self):
        if self.index >= self.n_batches:
            self.epoch, self.index = self.epoch + 1, 0
            self.order = epoch_order(self.seed, self.epoch, self.n_batches)
        batch = self.order[self.index]
        self.index += 1
        return batch

    def state(self):
        return {
            "epoch": self.epoch,
            "index": self.index,
            "n_batches": self.n_batches,
            "order": list(self.order),
        }

    @classmethod
    def restore(cls, saved, n_batches, seed):
        """Continue from a saved position; None if it does not fit these batches."""
        if not saved or saved.get("n_batches") != n_batches:
            return None
        order = cls(n_batches, seed, saved["epoch"], saved["index"])
        if order.order != saved.get("order"):
            return None
        return order


def evaluate_loss(model, examples, batch_size, num_batches=-1, loss_fn=None, rank=0, size=1, all_sum=None):
    """Token-weighted mean loss over the examples (all of them unless num_batches >= 0).

    Several processes (size > 1): batch_size is the global batch size, each process evaluates
    its shard of every batch and all_sum((loss sum, token count)) adds them up across the
    processes, so every one returns what a single process would."""
    import mlx.core as mx

    from train.loss import TargetLoss

    loss_fn = loss_fn or TargetLoss(model).mean_loss
    batches = make_batches(examples, batch_size)
    if num_batches is not None and num_batches >= 0:
        batches = batches[:num_batches]
    total, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for indices in batches:
            indices = shard(indices, rank, size)
            if not indices:
                continue
            batch, lengths, _ = collate(examples, indices)
            loss, ntoks = loss_fn(model, batch, lengths)
            mx.eval(loss, ntoks)
            total += loss.item() * ntoks.item()
            tokens += ntoks.item()
    finally:
        model.train(was_training)
    if size > 1 and all_sum is not None:
        total, tokens = all_sum([total, tokens])
        tokens = int(round(tokens))
    return (total / tokens if tokens else math.nan), tokens
