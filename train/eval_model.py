"""The model side of evaluation, shared by train/evaluate.py and train/promote.py: load a run's
base model, answer conversations greedily through the one prompt path (core.prompt.encode_prompt,
with the run's system prompt), judge the answers against their key facts (train/facts.py), and
measure the perplexity of plain text (the forgetting check)."""

import math
from pathlib import Path

from core import paths
from core.prompt import encode_prompt
from train import batches, facts

TEXT_CHUNK = 256  # tokens per window of the general-text perplexity
FORGETTING_LIMIT = 1.15  # fine-tuned general-text perplexity above base x this: flagged
FORGETTING_RULE = (
    f"forgetting: the fine-tuned model's perplexity on the general text is more than "
    f"{FORGETTING_LIMIT - 1:.0%} above the base model's"
)


def load_base(model_name, meta):
    """(model, tokenizer) of the base, with the run's chat template when it recorded one."""
    from mlx_lm import load

    model, tokenizer = load(str(model_name))
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]
    return model, tokenizer


def generate_answers(model, tokenizer, prompts, max_tokens):
    """Greedy answers, batched (mlx_lm.batch_generate), as text."""
    from mlx_lm.generate import batch_generate

    if not prompts:
        return []
    result = batch_generate(model, tokenizer, prompts, max_tokens=max_tokens)
    return [t.strip() for t in result.texts]


def answer_all(model, tokenizer, conversations, system_prompt, max_tokens):
    """Greedy answers to conversations that end with the question (a user turn), in one batch."""
    prompts = [encode_prompt(tokenizer, m, system_prompt) for m in conversations]
    return generate_answers(model, tokenizer, prompts, max_tokens)


def answer_budget(tokenizer, answers, cap, margin=16):
    """max_tokens for evaluation: a little over the longest reference answer, at most cap."""
    longest = max((len(tokenizer.encode(a, add_special_tokens=False)) for a in answers), default=0)
    return min(int(cap), longest + margin)


def refusals(sets):
    """The spellings of the decline reply: every spelling of the out-of-scope set's facts."""
    items = sets.get("out_of_scope") or []
    return sorted({s for _, named in items for fact in named for s in fact})


def judge_all(answers, facts_list, refused=()):
    """(judgements, summary) of answers against their facts (facts.judge, with the refusal
    spellings); an answer whose conversation names no facts is not judged (None) nor counted."""
    judgements = [facts.judge(a, f, refused) if f else None for a, f in zip(answers, facts_list)]
    return judgements, facts.summarise([j for j in judgements if j is not None])


def declines(answers, facts_list, refused=()):
    """(judgements, summary) on out-of-scope questions: 'invented' counts the answers that do not
    decline (facts.INVENTS_RULE)."""
    judgements, summary = judge_all(answers, facts_list, refused)
    invented = summary["of"] - summary["correct"]
    return judgements, {
        "declined": summary["correct"],
        "invented": invented,
        "of": summary["of"],
        "invention_rate": invented / summary["of"] if summary["of"] else 0.0,
        "degenerate": summary["degenerate"],
    }


# --------------------------------------------------------------------------- general text


def general_texts(folder=paths.GENERAL_TEXT):
    """[(file name, text)] of the general-text set (*.txt), sorted; [] when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [(p.name, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"))]


def text_perplexity(model, examples, batch_size=4):
    """{"loss", "perplexity", "tokens"} of the model on batches.text_windows."""
    loss, tokens = batches.evaluate_loss(model, examples, batch_size)
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def perplexity(loss):
    return math.exp(loss) if loss < 700 else math.inf


def forgetting(base, tuned):
    """{"ratio", "limit", "flagged"}: the fine-tuned general-text perplexity over the base's."""
    ratio = tuned["perplexity"] / base["perplexity"] if base["perplexity"] else math.inf
    return {"ratio": ratio, "limit": FORGETTING_LIMIT, "flagged": not ratio <= FORGETTING_LIMIT}
