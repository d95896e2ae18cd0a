"""The trainer's loss (train/loss.py: the output layer at the targets only) against mlx-lm's
default_loss (every position's logits), one training step's forward and backward each, on the
same real batches, alternating in one process:

    python -m bench.loss_ab --model models/smollm2-135m-instruct --data data [--batches 6] [--rounds 3]

Adapters as train/demo.yaml set them until 2026-12-06 (top 8 blocks, rank 16; --layers 16: the
demo's now), the prepared training split encoded with the model's template and the data's
system prompt, batches of 4 as the trainer forms them (similar lengths together, prompts
masked). A third contender is ours with the frozen blocks' output of every batch kept
(train/frozen_blocks.py), as the trainer runs a batch met before (every epoch after the
first). Each round runs every batch with one loss, then with the next (the order alternates),
so each loss finds the allocator's buffers as a training run leaves them. Prints, per loss,
the median seconds per step and the peak memory, then the median of the rounds' ratios
(default_loss time over ours; ours over ours kept), the largest relative difference between
ours and default_loss on a batch, and whether ours kept gave ours' losses to the bit.
"""

import argparse
import statistics
import time

import train  # noqa: F401  (the optimised BLAS before mlx)
from train import batches
from train.loss import TargetLoss
from train.method import add_adapters

LORA = {"fine_tune_type": "lora", "num_layers": 8, "grad_checkpoint": False}
LORA["lora_parameters"] = {"rank": 16, "scale": 10.0, "dropout": 0.0}


def real_batches(tokenizer, data_dir, batch_size, count):
    split = batches.read_split(f"{data_dir}/train.jsonl")
    system = batches.common_system_prompt(split.conversations)  # the one `make data` put there
    enc = batches.encode(tokenizer, split.conversations, system, True, 512, "last", split.where)
    groups = batches.make_batches(enc.examples, batch_size)
    step = max(len(groups) // count, 1)  # spread over the lengths: short and long batches
    return [batches.collate(enc.examples, g) for g in groups[::step][:count]]


def timed_round(model, fn, batches_, with_count):
    """Seconds of one pass over the batches (the first left out: it sets up the allocator's
    buffers for this loss), the peak memory, the losses' sums."""
    import mlx.core as mx

    seconds, sums = 0.0, []
    mx.reset_peak_memory()
    for n, (batch, lengths, _) in enumerate(batches_):
        start = time.perf_counter()
        (loss, count), grads = fn(model, batch, lengths, *((1.0,) if with_count else ()))
        mx.eval(loss, count, grads)
        seconds += (time.perf_counter() - start) if n else 0.0
        sums.append(loss.item() * (1.0 if with_count else count.item()))
    return seconds, mx.get_peak_memory(), sums


def main(argv=None):
    import mlx.nn as nn
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.utils import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default="data")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=LORA["num_layers"], help="adapted blocks (demo: 16)")
    args = ap.parse_args(argv)
    model, tokenizer = load(args.model)
    add_adapters(model, dict(LORA, num_layers=args.layers))
    ours, kept = TargetLoss(model), TargetLoss(model, keep_frozen=True)
    print(f"model {args.model}: output layer at the targets only: {ours.targets_only}")
    print(f"frozen blocks below the {args.layers} adapted: {kept.frozen.frozen}, kept: {kept.frozen.on}")
    runs = {
        "default_loss": (nn.value_and_grad(model, default_loss), False),
        "ours": (nn.value_and_grad(model, ours.sum_loss), True),
        "ours, kept": (nn.value_and_grad(model, kept.sum_loss), True),
    }
    data = real_batches(tokenizer, args.data, 4, args.batches + 1)
    for batch, _, _ in data:  # every batch met before: a step of the second epoch on
        kept.frozen.keep(model, batch[:, :-1])
    times, peaks, worst, kept_differs = {k: [] for k in runs}, dict.fromkeys(runs, 0), 0.0, False
    for r in range(args.rounds):
        results = {}
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:  # who goes first alternates
            fn, with_count = runs[name]
            seconds, peak, sums = timed_round(model, fn, data, with_count)
            times[name].append(seconds), results.setdefault(name, sums)
            peaks[name] = max(peaks[name], peak)
        worst = max([worst] + [abs(a - b) / abs(b) for a, b in zip(results["ours"], results["default_loss"])])
        kept_differs = kept_differs or results["ours, kept"] != results["ours"]
    ratios = [a / b for a, b in zip(times["default_loss"], times["ours"])]
    kept_ratios = [a / b for a, b in zip(times["ours"], times["ours, kept"])]
    steps = len(data) - 1
    for name, ts in times.items():
        print(
            f"{name:>12}: {statistics.median(ts) / steps:.3f} s/step (median of {len(ts)} rounds of {steps}), peak {peaks[name] / 1e6:,.0f} MB"
        )
    print(f"default_loss / ours, median of the rounds' ratios: {statistics.median(ratios):.2f}x")
    print(f"largest relative difference of the losses: {worst:.1e}")
    print(f"ours / ours with the frozen blocks' output kept: {statistics.median(kept_ratios):.2f}x")
    print(f"losses with and without it: {'DIFFERENT' if kept_differs else 'the same to the bit'}")


if __name__ == "__main__":
    main()
