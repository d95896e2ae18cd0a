"""Compare the base model and the fine-tuned one (models/NAME) on held-out conversations.

    python -m train.evaluate --name NAME [--data D] [--model M] [--split valid|train]
        [--max-tokens N] [--limit N] [--models-dir DIR]

For both models: the loss and perplexity on the split's answers (the same loss as training),
and greedy answers to its questions - each conversation minus its last answer, formatted by
core.prompt.encode_prompt with the run's system prompt, exactly as the worker formats it -
scored against the reference answers: exact match, token F1 and chrF (sacrebleu).
Writes models/NAME/eval.json and eval.md (eval-train.* for --split train).
"""

import argparse
import json
import math
import re
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

from core import atomic, paths
from core.prompt import encode_prompt
from train import batches, bundle


def log(message):
    print(f"evaluate: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- scores


def normalize(text):
    return unicodedata.normalize("NFC", text).strip()


def tokens(text):
    return re.findall(r"\w+", normalize(text).lower())


def token_f1(hypothesis, reference):
    h, r = tokens(hypothesis), tokens(reference)
    if not h and not r:
        return 1.0
    common = sum((Counter(h) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(h), common / len(r)
    return 2 * precision * recall / (precision + recall)


def score(hypotheses, references):
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    rows = []
    for h, r in zip(hypotheses, references):
        rows.append(
            {
                "exact": normalize(h) == normalize(r),
                "f1": token_f1(h, r),
                "chrf": chrf.sentence_score(h, [r]).score,
            }
        )
    n = max(len(rows), 1)
    summary = {
        "exact_match": sum(x["exact"] for x in rows) / n,
        "exact_count": sum(x["exact"] for x in rows),
        "token_f1": sum(x["f1"] for x in rows) / n,
        "chrf": chrf.corpus_score(list(hypotheses), [list(references)]).score if rows else 0.0,
    }
    return summary, rows


# --------------------------------------------------------------------------- generation


def generate_answers(model, tokenizer, prompts, max_tokens):
    """Greedy answers, batched (mlx_lm.batch_generate), as text."""
    from mlx_lm.generate import batch_generate

    if not prompts:
        return []
    result = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens)
    return [t.strip() for t in result.texts]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME")
    p.add_argument("--data", help="data folder (default: the one the run was trained on)")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--split", choices=("valid", "train"), default="valid")
    p.add_argument("--max-tokens", type=int, help="per answer (default: a little over the longest reference)")
    p.add_argument("--limit", type=int, help="only the first N conversations")
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_dir = paths.Layout.for_run(args.name, args.models_dir).run
    try:
        meta, train_cfg = bundle.read_run(run_dir)
    except bundle.BundleError as e:
        log(f"error: {e} - train first (make train NAME={args.name})")
        return 2
    data_file = (
        Path(args.data) / f"{args.split}.jsonl" if args.data else Path(meta["data"][args.split]["path"])
    )
    split = batches.read_split(data_file)
    conversations = [m for m in split.conversations if m and m[-1]["role"] == "assistant"]
    conversations = conversations[: args.limit] if args.limit else conversations
    if not conversations:
        log(f"error: no conversations in {data_file}")
        return 2
    tic = time.perf_counter()
    model_name = args.model or meta.get("base_model_path") or meta["base_model"]
    results, max_tokens = compare(model_name, run_dir, meta, train_cfg, conversations, args.max_tokens)
    report = make_report(args, data_file, split, conversations, model_name, meta, results, max_tokens)
    report["wall_time_s"] = round(time.perf_counter() - tic, 2)
    stem = "eval" if args.split == "valid" else f"eval-{args.split}"
    atomic.write_text(
        run_dir / f"{stem}.json", json.dumps(bundle.finite(report), indent=2, ensure_ascii=False) + "\n"
    )
    atomic.write_text(run_dir / f"{stem}.md", markdown(report))
    b, f, n = report["base"], report["fine_tuned"], len(conversations)
    print(
        f"{args.split} ({n} conversations)   base -> fine-tuned\n"
        f"  loss        {b['loss']:.4f} -> {f['loss']:.4f}\n"
        f"  perplexity  {b['perplexity']:.2f} -> {f['perplexity']:.2f}\n"
        f"  exact match {b['exact_count']}/{n} -> {f['exact_count']}/{n}\n"
        f"  token F1    {b['token_f1']:.3f} -> {f['token_f1']:.3f}\n"
        f"  chrF        {b['chrf']:.1f} -> {f['chrf']:.1f}\n"
        f"wrote {run_dir / (stem + '.json')} and {stem}.md"
    )
    return 0


def compare(model_name, run_dir, meta, train_cfg, conversations, max_tokens=None):
    """The base model, then with the run's (shipped) adapter: loss and greedy answers."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    system_prompt = meta.get("system_prompt")
    batch_size = int(meta.get("batch_size") or train_cfg.get("batch_size") or 8)
    log(f"loading {model_name}")
    model, tokenizer = load(model_name)
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]
    examples = batches.encode(
        tokenizer, conversations, system_prompt, True, int(meta.get("max_seq_length") or 2048)
    ).examples
    prompts = [encode_prompt(tokenizer, m[:-1], system_prompt) for m in conversations]
    references = [m[-1]["content"] for m in conversations]
    ref_lengths = [len(tokenizer.encode(r, add_special_tokens=False)) for r in references]
    max_tokens = max_tokens or min(int(meta["generation"].get("max_tokens") or 256), max(ref_lengths) + 16)
    results = {}
    for label in ("base", "fine_tuned"):
        if label == "fine_tuned":
            load_adapters(model, str(run_dir))
        model.eval()
        loss, ntoks = batches.evaluate_loss(model, examples, batch_size)
        log(
            f"{label}: loss {loss:.4f} over {ntoks} answer tokens; generating {len(prompts)} answers "
            f"(max {max_tokens} tokens)"
        )
        answers = generate_answers(model, tokenizer, prompts, max_tokens)
        summary, rows = score(answers, references)
        results[label] = {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "answer_tokens": ntoks,
            **summary,
            "answers": answers,
            "rows": rows,
        }
    return results, max_tokens


def make_report(args, data_file, split, conversations, model_name, meta, results, max_tokens):
    base, tuned = results["base"], results["fine_tuned"]
    return {
        "name": args.name,
        "split": args.split,
        "data": {"path": str(data_file), "sha256": split.sha256, "count": len(conversations)},
        "base_model": model_name,
        "system_prompt": meta.get("system_prompt"),
        "max_tokens": max_tokens,
        "adapter": {"source": meta.get("adapter_source"), "step": meta.get("adapter_step")},
        "base": {k: v for k, v in base.items() if k not in ("answers", "rows")},
        "fine_tuned": {k: v for k, v in tuned.items() if k not in ("answers", "rows")},
        "examples": [
            {
                "question": _question(m),
                "reference": m[-1]["content"],
                "base": base["answers"][i],
                "fine_tuned": tuned["answers"][i],
                "base_scores": base["rows"][i],
                "fine_tuned_scores": tuned["rows"][i],
            }
            for i, m in enumerate(conversations)
        ],
    }


def _question(messages):
    users = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    return users[-1] if users else ""


def _cell(text):
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report):
    b, f = report["base"], report["fine_tuned"]
    n = report["data"]["count"]
    lines = [
        f"# Evaluation of `{report['name']}` on {report['split']} ({n} conversations)",
        "",
        f"Base model `{report['base_model']}`; greedy answers, at most {report['max_tokens']} tokens; "
        f"fine-tuned: the run's {report['adapter']['source'] or 'shipped'} adapter (step {report['adapter']['step']}).",
        "",
        "| metric | base | fine-tuned |",
        "|---|---|---|",
        f"| loss | {b['loss']:.4f} | {f['loss']:.4f} |",
        f"| perplexity | {b['perplexity']:.2f} | {f['perplexity']:.2f} |",
        f"| exact match | {b['exact_count']}/{n} ({b['exact_match']:.0%}) | {f['exact_count']}/{n} ({f['exact_match']:.0%}) |",
        f"| token F1 | {b['token_f1']:.3f} | {f['token_f1']:.3f} |",
        f"| chrF | {b['chrf']:.1f} | {f['chrf']:.1f} |",
        "",
        "## Examples",
        "",
        "| question | reference | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for ex in report["examples"]:
        mark = " ✓" if ex["fine_tuned_scores"]["exact"] else ""
        lines.append(
            f"| {_cell(ex['question'])} | {_cell(ex['reference'])} | {_cell(ex['base'])} | "
            f"{_cell(ex['fine_tuned'])}{mark} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
