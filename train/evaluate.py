"""Compare the base model and the fine-tuned one (models/NAME) on what the club cares about.

    python -m train.evaluate --name NAME [--data D] [--model M] [--split valid|train]
        [--max-tokens N] [--limit N] [--general-text DIR] [--models-dir DIR]
        [--engine mlx|llamacpp] [--gguf FILE]

For both models, under the same prompt (core.prompt.encode_prompt with the run's system prompt,
exactly as the worker formats it), greedy answers:
- the split: loss and perplexity on its answers (the same loss as training); its questions
  answered and scored against the reference answers (exact match, token F1, chrF) and, where a
  conversation names facts, key-fact accuracy (train/facts.py: every fact there, no loop);
- DATA/eval/paraphrases.jsonl (make data): key-fact accuracy on questions worded unlike the
  training ones, follow-up turns included;
- DATA/eval/out_of_scope.jsonl: how often the model invents instead of declining;
- the general text (data/general/*.txt): perplexity, flagged when the fine-tuned model's is more
  than 15% above the base's (forgetting).
Writes models/NAME/eval.json and eval.md (eval-train.* for --split train): every answer shown.
--engine llamacpp also asks the fine-tuned model the same questions through the llama.cpp engine
(the run's fused GGUF, or --gguf) and sets its key-fact accuracy beside mlx's
(train/eval_llamacpp.py): exit 3 when a measure differs by more than one question.
"""

import argparse
import json
import re
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

from core import atomic, paths
from train import batches, bundle, eval_llamacpp, eval_model, eval_report, eval_sets

EXIT_ENGINES_DIFFER = 3


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


# --------------------------------------------------------------------------- inputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME")
    p.add_argument("--data", help="data folder (default: the one the run was trained on)")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--split", choices=("valid", "train"), default="valid")
    p.add_argument("--max-tokens", type=int, help="per answer (default: a little over the longest reference)")
    p.add_argument("--limit", type=int, help="only the first N conversations of the split and of each set")
    p.add_argument(
        "--general-text", default=str(paths.GENERAL_TEXT), help="folder of *.txt for the forgetting check"
    )
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    p.add_argument(
        "--engine",
        choices=("mlx", "llamacpp"),
        default="mlx",
        help="llamacpp: also answer through the llama.cpp engine, key facts beside mlx's (make llamacpp, make fuse)",
    )
    p.add_argument(
        "--gguf", help="with --engine llamacpp: the GGUF (default: the run's fused/ggml-model-f16.gguf)"
    )
    return p.parse_args(argv)


class Inputs:
    """What one evaluation reads: the split's conversations and facts, the evaluation sets, the
    general text, and the answers whose lengths set the generation budget."""

    def __init__(self, args, meta):
        if args.data:
            data_dir = Path(args.data)
            self.data_file = data_dir / f"{args.split}.jsonl"
        else:
            self.data_file = Path(meta["data"][args.split]["path"])
            data_dir = self.data_file.parent
        self.split = batches.read_split(self.data_file)
        named = eval_sets.read_facts(self.data_file) if self.split.conversations else []
        pairs = [
            (m, f) for m, f in zip(self.split.conversations, named) if m and m[-1]["role"] == "assistant"
        ]
        pairs = pairs[: args.limit] if args.limit else pairs
        self.conversations = [m for m, _ in pairs]
        self.facts = [f for _, f in pairs]
        sets = eval_sets.read_prepared(data_dir)
        self.refused = eval_model.refusals(sets)  # from the whole out-of-scope set, before --limit
        self.sets = {name: items[: args.limit] if args.limit else items for name, items in sets.items()}
        self.eval_dir = data_dir / eval_sets.EVAL_DIR
        self.texts = eval_model.general_texts(args.general_text)
        self.general_text = args.general_text
        train_split = batches.read_split(data_dir / "train.jsonl")
        self.answers = [m[-1]["content"] for m in self.conversations + train_split.conversations if m]


def main(argv=None):
    args = parse_args(argv)
    run_dir = paths.Layout.for_run(args.name, args.models_dir).run
    try:
        meta, train_cfg = bundle.read_run(run_dir)
    except bundle.BundleError as e:
        log(f"error: {e} - train first (make train NAME={args.name})")
        return 2
    inputs = Inputs(args, meta)
    if not inputs.conversations:
        log(f"error: no conversations in {inputs.data_file}")
        return 2
    tic = time.perf_counter()
    problem = args.engine == "llamacpp" and eval_llamacpp.unavailable(run_dir, args.gguf)
    if problem:
        log(f"error: {problem}")
        return 2
    model_name = args.model or meta.get("base_model_path") or meta["base_model"]
    results, max_tokens = compare(model_name, run_dir, meta, train_cfg, inputs, args.max_tokens)
    report = eval_report.make_report(args, inputs, model_name, meta, results, max_tokens)
    md, text, status = eval_report.markdown(report), eval_report.console(report), 0
    if args.engine == "llamacpp":
        try:
            report["llamacpp"] = through_llamacpp(args, run_dir, inputs, results["fine_tuned"], max_tokens)
            md += eval_llamacpp.markdown(report["llamacpp"])
            text += "\n" + eval_llamacpp.console(report["llamacpp"])
            status = 0 if report["llamacpp"]["within_one_question"] else EXIT_ENGINES_DIFFER
        except eval_llamacpp.EngineError as e:
            log(f"error: the llama.cpp engine: {e}")
            status = 2
    report["wall_time_s"] = round(time.perf_counter() - tic, 2)
    stem = "eval" if args.split == "valid" else f"eval-{args.split}"
    atomic.write_text(
        run_dir / f"{stem}.json", json.dumps(bundle.finite(report), indent=2, ensure_ascii=False) + "\n"
    )
    atomic.write_text(run_dir / f"{stem}.md", md)
    print(text + f"\nwrote {run_dir / (stem + '.json')} and {stem}.md")
    if status == EXIT_ENGINES_DIFFER:
        log(f"the engines differ: not {eval_llamacpp.RULE} (see {stem}.md)")
    return status


def through_llamacpp(args, run_dir, inputs, mlx, max_tokens):
    """The fine-tuned model's answers through the llama.cpp engine, judged as mlx's, beside them."""
    gguf = args.gguf or eval_llamacpp.fused_gguf(run_dir)
    questions = questions_of(inputs)
    log(f"llamacpp: generating {len(questions)} answers through the llama.cpp engine on {gguf}")
    tic = time.perf_counter()
    answers = eval_llamacpp.answer(run_dir, questions, max_tokens, model=args.model, gguf=args.gguf)
    log(f"llamacpp: answered in {time.perf_counter() - tic:.1f}s")
    return eval_llamacpp.compare(args.split, mlx, judged(answers, inputs), gguf)


# --------------------------------------------------------------------------- the two models


def compare(model_name, run_dir, meta, train_cfg, inputs, max_tokens=None):
    """The base model, then with the run's (shipped) adapter: losses, answers, judgements."""
    from mlx_lm.tuner.utils import load_adapters

    system_prompt = meta.get("system_prompt")
    batch_size = int(meta.get("batch_size") or train_cfg.get("batch_size") or 8)
    log(f"loading {model_name}")
    model, tokenizer = eval_model.load_base(model_name, meta)
    conversations = inputs.conversations
    examples = batches.encode(
        tokenizer, conversations, system_prompt, True, int(meta.get("max_seq_length") or 2048)
    ).examples
    text_examples = batches.text_windows(tokenizer, [t for _, t in inputs.texts], eval_model.TEXT_CHUNK)
    questions = questions_of(inputs)
    cap = int(meta["generation"].get("max_tokens") or 256)
    max_tokens = max_tokens or eval_model.answer_budget(tokenizer, inputs.answers, cap)
    results = {}
    for label in ("base", "fine_tuned"):
        if label == "fine_tuned":
            load_adapters(model, str(run_dir))
        model.eval()
        loss, ntoks = batches.evaluate_loss(model, examples, batch_size)
        log(
            f"{label}: loss {loss:.4f} over {ntoks} answer tokens; generating {len(questions)} answers "
            f"(max {max_tokens} tokens)"
        )
        tic = time.perf_counter()
        answers = eval_model.answer_all(model, tokenizer, questions, system_prompt, max_tokens)
        log(f"{label}: answered in {time.perf_counter() - tic:.1f}s")
        results[label] = side(loss, ntoks, answers, inputs)
        if text_examples:
            results[label]["general_text"] = eval_model.text_perplexity(model, text_examples, batch_size)
    return results, max_tokens


def questions_of(inputs):
    """Every question asked, in order: the split's conversations without their answers, then each
    evaluation set's."""
    return [m[:-1] for m in inputs.conversations] + [
        item[0] for items in inputs.sets.values() for item in items
    ]


def side(loss, ntoks, answers, inputs):
    """One model's results: the loss, then judged() answers."""
    return {
        "loss": loss,
        "perplexity": eval_model.perplexity(loss),
        "answer_tokens": ntoks,
        **judged(answers, inputs),
    }


def judged(answers, inputs):
    """Answers to questions_of(inputs) scored and judged: the split's scores and key facts, then
    each evaluation set's."""
    n = len(inputs.conversations)
    own, rest = answers[:n], answers[n:]
    summary, rows = score(own, [m[-1]["content"] for m in inputs.conversations])
    refused = inputs.refused
    judgements, key_facts = eval_model.judge_all(own, inputs.facts, refused)
    result = {
        **summary,
        "key_facts": key_facts,
        "answers": own,
        "rows": rows,
        "judgements": judgements,
        "sets": {},
    }
    for name, items in inputs.sets.items():
        mine, rest = rest[: len(items)], rest[len(items) :]
        judge = eval_model.declines if name == "out_of_scope" else eval_model.judge_all
        set_judgements, set_summary = judge(mine, [f for _, f in items], refused)
        result["sets"][name] = {"answers": mine, "judgements": set_judgements, "summary": set_summary}
    return result


if __name__ == "__main__":
    sys.exit(main())
