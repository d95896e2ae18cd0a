"""Eval-gated promotion: make models/current point at a candidate only when it is better.

    python -m train.promote --name CANDIDATE [--metric loss|perplexity|token_f1|chrf|exact_match]
        [--force] [--data DIR] [--limit N] [--models-dir DIR]

Evaluates the candidate (models/CANDIDATE) and the adapter live now (models/current, a
symlink to a run folder) on the same validation data (the candidate's, or DIR/valid.jsonl)
with train/evaluate.py's functions, prints the comparison, and switches models/current
atomically (a new symlink renamed over the old one) only when the candidate is strictly
better on the metric (default: validation loss), or with --force. A server following
models/current (examples/express) reloads by itself.

Exit status: 0 promoted (or first promotion, or already current), 3 not better (refused),
2 a run folder or the data cannot be read.
"""

import argparse
import math
import os
import sys
from pathlib import Path

from core import atomic, paths
from core.prompt import encode_prompt
from train import batches, bundle, evaluate

CURRENT = "current"
REFUSED = 3
# name -> (key in the evaluation, True when higher is better, needs generated answers)
METRICS = {
    "loss": ("loss", False, False),
    "perplexity": ("perplexity", False, False),
    "token_f1": ("token_f1", True, True),
    "chrf": ("chrf", True, True),
    "exact_match": ("exact_count", True, True),
}


def log(message):
    print(f"promote: {message}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.promote", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="the candidate run, models/NAME")
    p.add_argument("--metric", default="loss", choices=sorted(METRICS), help="default: loss (validation)")
    p.add_argument("--force", action="store_true", help="switch even when the candidate is not better")
    p.add_argument(
        "--data", default=None, help="folder with valid.jsonl (default: the candidate's validation data)"
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N conversations only")
    p.add_argument("--models-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def evaluate_run(run_dir, conversations, metric):
    """{loss, perplexity[, token_f1, chrf, exact_count]} of one run's adapter on its own base."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    meta, train_cfg = bundle.read_run(run_dir)
    model_name = meta.get("base_model_path") or meta["base_model"]
    model, tokenizer = load(model_name)
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]
    load_adapters(model, str(run_dir))
    model.eval()
    system_prompt = meta.get("system_prompt")
    examples = batches.encode(
        tokenizer, conversations, system_prompt, True, int(meta.get("max_seq_length") or 2048)
    ).examples
    batch_size = int(meta.get("batch_size") or train_cfg.get("batch_size") or 8)
    loss, _ = batches.evaluate_loss(model, examples, batch_size)
    result = {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
    if METRICS[metric][2]:
        prompts = [encode_prompt(tokenizer, m[:-1], system_prompt) for m in conversations]
        references = [m[-1]["content"] for m in conversations]
        max_tokens = int(meta["generation"].get("max_tokens") or 256)
        answers = evaluate.generate_answers(model, tokenizer, prompts, max_tokens)
        summary, _ = evaluate.score(answers, references)
        result.update(summary)
    return result


def is_better(candidate, current, metric):
    key, higher, _ = METRICS[metric]
    a, b = candidate[key], current[key]
    if not math.isfinite(a):
        return False
    return a > b if higher else a < b or not math.isfinite(b)


def switch_current(models, name):
    """models/current -> NAME, atomically: a new relative symlink renamed over the old one."""
    link = models / CURRENT
    tmp = models / f".{CURRENT}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, link)
    atomic.fsync_dir(models)  # the rename survives a crash


def validation(meta, data_dir, limit):
    data_file = Path(data_dir) / "valid.jsonl" if data_dir else Path(meta["data"]["valid"]["path"])
    conversations = [
        m for m in batches.read_split(data_file).conversations if m and m[-1]["role"] == "assistant"
    ]
    return data_file, conversations[:limit] if limit else conversations


def print_comparison(metric, data_file, n, current_name, current, candidate_name, candidate):
    key = METRICS[metric][0]
    print(f"validation: {data_file} ({n} conversations); metric: {metric}")
    print(f"  {'':12} {'current (' + current_name + ')':>28} {'candidate (' + candidate_name + ')':>28}")
    for k in ("loss", "perplexity", "token_f1", "chrf", "exact_count"):
        if k in candidate:
            mark = "  <- metric" if k == key else ""
            print(f"  {k:12} {current.get(k, float('nan')):>28.4f} {candidate[k]:>28.4f}{mark}")


def main(argv=None):
    args = parse_args(argv)
    models = Path(args.models_dir).resolve() if args.models_dir else paths.MODELS
    cand_dir = models / args.name
    link = models / CURRENT
    try:
        meta, _ = bundle.read_run(cand_dir)
        data_file, conversations = validation(meta, args.data, args.limit)
    except (bundle.BundleError, OSError, ValueError, KeyError) as e:
        log(f"error: {e}")
        return 2
    if not conversations:
        log(f"error: no conversations in {data_file}")
        return 2
    live = link.resolve() if link.is_symlink() else None
    if live is not None and live == cand_dir.resolve():
        print(f"{args.name} is already current")
        return 0
    candidate = evaluate_run(cand_dir, conversations, args.metric)
    if live is None or not live.is_dir():
        print(f"no live adapter ({link} missing): promoting {args.name} (loss {candidate['loss']:.4f})")
        switch_current(models, args.name)
        return 0
    current = evaluate_run(live, conversations, args.metric)
    print_comparison(args.metric, data_file, len(conversations), live.name, current, args.name, candidate)
    better = is_better(candidate, current, args.metric)
    if not better and not args.force:
        print(
            f"not promoted: {args.name} is not better than {live.name} on {args.metric} "
            f"(FORCE=1 to switch anyway); {CURRENT} -> {live.name}"
        )
        return REFUSED
    switch_current(models, args.name)
    print(f"promoted: {CURRENT} -> {args.name}" + ("" if better else " (forced)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
