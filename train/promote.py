"""Eval-gated promotion: make models/current point at a candidate only when it is better.

    python -m train.promote --name CANDIDATE [--metric loss|perplexity|token_f1|chrf|exact_match|
        key_facts|key_facts_valid] [--force] [--data DIR] [--limit N] [--models-dir DIR]

Evaluates the candidate (models/CANDIDATE) and the adapter live now (models/current, a
symlink to a run folder) on the same validation data (the candidate's, or DIR/valid.jsonl)
with the evaluation's functions (train/eval_model.py), prints the comparison, and switches
models/current atomically (a new symlink renamed over the old one) only when the candidate is
strictly better on the metric (default: validation loss), or with --force. A server following
models/current (examples/express) reloads by itself.

key_facts, the club's measure: how many questions of the paraphrase set (DIR/eval/paraphrases.jsonl,
written by make data) get an answer holding every key fact, not a loop (train/facts.py);
key_facts_valid: the same on the validation conversations that name facts.

Exit status: 0 promoted (or first promotion, or already current), 3 not better (refused),
2 a run folder or the data cannot be read.
"""

import argparse
import math
import os
import sys
from pathlib import Path

from core import atomic, paths
from train import batches, bundle, eval_model, eval_sets, evaluate

CURRENT = "current"
REFUSED = 3
# name -> (key in the evaluation, True when higher is better, needs generated answers)
METRICS = {
    "loss": ("loss", False, False),
    "perplexity": ("perplexity", False, False),
    "token_f1": ("token_f1", True, True),
    "chrf": ("chrf", True, True),
    "exact_match": ("exact_count", True, True),
    "key_facts": ("key_facts", True, True),  # on the paraphrase set
    "key_facts_valid": ("key_facts_valid", True, True),
}
SHOWN = ("loss", "perplexity", "token_f1", "chrf", "exact_count", "key_facts", "key_facts_valid")


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


def evaluate_run(run_dir, data, metric):
    """{loss, perplexity[, token_f1, chrf, exact_count, key_facts or key_facts_valid]} of one run's
    adapter on its own base."""
    from mlx_lm.tuner.utils import load_adapters

    meta, train_cfg = bundle.read_run(run_dir)
    model, tokenizer = eval_model.load_base(meta.get("base_model_path") or meta["base_model"], meta)
    load_adapters(model, str(run_dir))
    model.eval()
    system_prompt = meta.get("system_prompt")
    conversations = data.conversations
    examples = batches.encode(
        tokenizer, conversations, system_prompt, True, int(meta.get("max_seq_length") or 2048)
    ).examples
    batch_size = int(meta.get("batch_size") or train_cfg.get("batch_size") or 8)
    loss, _ = batches.evaluate_loss(model, examples, batch_size)
    result = {"loss": loss, "perplexity": eval_model.perplexity(loss)}
    if not METRICS[metric][2]:
        return result
    cap = int(meta["generation"].get("max_tokens") or 256)
    max_tokens = eval_model.answer_budget(tokenizer, data.answers, cap)
    answer = lambda questions: eval_model.answer_all(model, tokenizer, questions, system_prompt, max_tokens)  # noqa: E731
    answers = answer([m[:-1] for m in conversations])
    summary, _ = evaluate.score(answers, [m[-1]["content"] for m in conversations])
    result.update(summary)
    result["key_facts_valid"] = eval_model.judge_all(answers, data.facts, data.refused)[1]["correct"]
    if metric == "key_facts":
        items = data.paraphrases
        judged = eval_model.judge_all(answer([m for m, _ in items]), [f for _, f in items], data.refused)
        result["key_facts"] = judged[1]["correct"]
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


class Validation:
    """The data both runs are evaluated on: the validation conversations (with their facts) and,
    for key_facts, the paraphrase set beside them."""

    def __init__(self, meta, data_dir, limit, metric):
        self.path = Path(data_dir) / "valid.jsonl" if data_dir else Path(meta["data"]["valid"]["path"])
        split = batches.read_split(self.path)
        named = eval_sets.read_facts(self.path) if split.conversations else []
        pairs = [(m, f) for m, f in zip(split.conversations, named) if m and m[-1]["role"] == "assistant"]
        pairs = pairs[:limit] if limit else pairs
        self.conversations = [m for m, _ in pairs]
        self.facts = [f for _, f in pairs]
        train = batches.read_split(self.path.parent / "train.jsonl").conversations
        self.answers = [m[-1]["content"] for m in self.conversations + train if m]  # the answer budget
        sets = eval_sets.read_prepared(self.path.parent)
        self.refused = eval_model.refusals(sets)  # a decline is no answer to a question the data answers
        self.paraphrases = []
        if metric == "key_facts":
            self.paraphrases = sets.get("paraphrases", [])[:limit]
            if not self.paraphrases:
                where = self.path.parent / eval_sets.EVAL_DIR / "paraphrases.jsonl"
                raise ValueError(
                    f"{where}: no paraphrase set for METRIC=key_facts (make data writes it from RAW/eval/)"
                )
        if metric == "key_facts_valid" and not any(self.facts):
            raise ValueError(
                f"{self.path}: no conversation names facts, METRIC=key_facts_valid has nothing to count"
            )


def print_comparison(metric, data, current_name, current, candidate_name, candidate):
    key = METRICS[metric][0]
    sets = f" + {len(data.paraphrases)} paraphrases" if data.paraphrases else ""
    print(f"validation: {data.path} ({len(data.conversations)} conversations{sets}); metric: {metric}")
    print(f"  {'':16} {'current (' + current_name + ')':>28} {'candidate (' + candidate_name + ')':>28}")
    for k in SHOWN:
        if k in candidate:
            mark = "  <- metric" if k == key else ""
            print(f"  {k:16} {current.get(k, float('nan')):>28.4f} {candidate[k]:>28.4f}{mark}")


def main(argv=None):
    args = parse_args(argv)
    models = Path(args.models_dir).resolve() if args.models_dir else paths.MODELS
    cand_dir = models / args.name
    link = models / CURRENT
    try:
        meta, _ = bundle.read_run(cand_dir)
        data = Validation(meta, args.data, args.limit, args.metric)
    except (bundle.BundleError, OSError, ValueError, KeyError) as e:
        log(f"error: {e}")
        return 2
    if not data.conversations:
        log(f"error: no conversations in {data.path}")
        return 2
    live = link.resolve() if link.is_symlink() else None
    if live is not None and live == cand_dir.resolve():
        print(f"{args.name} is already current")
        return 0
    candidate = evaluate_run(cand_dir, data, args.metric)
    if live is None or not live.is_dir():
        print(f"no live adapter ({link} missing): promoting {args.name} (loss {candidate['loss']:.4f})")
        switch_current(models, args.name)
        return 0
    current = evaluate_run(live, data, args.metric)
    print_comparison(args.metric, data, live.name, current, args.name, candidate)
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
