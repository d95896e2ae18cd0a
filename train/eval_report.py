"""train/evaluate.py's outputs: eval.json (make_report), eval.md (markdown) and the console
summary (console), base and fine-tuned side by side, every answer shown with its judgement."""

from train import eval_model, facts

SET_TITLES = {"paraphrases": "Paraphrases", "out_of_scope": "Out of scope"}


def make_report(args, inputs, model_name, meta, results, max_tokens):
    base, tuned = results["base"], results["fine_tuned"]
    report = {
        "name": args.name,
        "split": args.split,
        "data": {
            "path": str(inputs.data_file),
            "sha256": inputs.split.sha256,
            "count": len(inputs.conversations),
        },
        "base_model": model_name,
        "system_prompt": meta.get("system_prompt"),
        "max_tokens": max_tokens,
        "adapter": {"source": meta.get("adapter_source"), "step": meta.get("adapter_step")},
        "base": _side(base, args.split, inputs),
        "fine_tuned": _side(tuned, args.split, inputs),
        "general_text": _general_text(inputs, base, tuned),
        "rules": {
            "key_facts": facts.KEY_FACT_RULE,
            "degenerate": facts.DEGENERATE_RULE,
            "invents": facts.INVENTS_RULE,
            "forgetting": eval_model.FORGETTING_RULE,
        },
        "examples": [
            _example(m, inputs.facts[i], base, tuned, i) for i, m in enumerate(inputs.conversations)
        ],
        "eval_sets": {
            name: {
                "path": str(inputs.eval_dir / f"{name}.jsonl"),
                "count": len(items),
                "examples": [
                    _set_example(item, base["sets"][name], tuned["sets"][name], i)
                    for i, item in enumerate(items)
                ],
            }
            for name, items in inputs.sets.items()
        },
    }
    return report


def _side(result, split, inputs):
    """One model's summary: the existing scores, then key facts, invention and general text."""
    keep = ("loss", "perplexity", "answer_tokens", "exact_match", "exact_count", "token_f1", "chrf")
    sets = result["sets"]
    return {
        **{k: result[k] for k in keep},
        "key_facts": {
            split: result["key_facts"],
            "paraphrases": sets["paraphrases"]["summary"] if "paraphrases" in sets else None,
        },
        "out_of_scope": sets["out_of_scope"]["summary"] if "out_of_scope" in sets else None,
        "general_text": result.get("general_text"),
    }


def _general_text(inputs, base, tuned):
    if not inputs.texts:
        return None
    return {
        "path": str(inputs.general_text),
        "files": [name for name, _ in inputs.texts],
        "tokens": base["general_text"]["tokens"],
        **eval_model.forgetting(base["general_text"], tuned["general_text"]),
    }


def _example(messages, named, base, tuned, i):
    return {
        "question": _question(messages[:-1]),
        "reference": messages[-1]["content"],
        "base": base["answers"][i],
        "fine_tuned": tuned["answers"][i],
        "base_scores": base["rows"][i],
        "fine_tuned_scores": tuned["rows"][i],
        "facts": named,
        "base_key_facts": base["judgements"][i],
        "fine_tuned_key_facts": tuned["judgements"][i],
    }


def _set_example(item, base, tuned, i):
    messages, named = item
    return {
        "conversation": messages,
        "question": _question(messages),
        "facts": named,
        "base": base["answers"][i],
        "fine_tuned": tuned["answers"][i],
        "base_judgement": base["judgements"][i],
        "fine_tuned_judgement": tuned["judgements"][i],
    }


def _question(messages):
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else ""


# --------------------------------------------------------------------------- text


def _pct(summary, key="correct"):
    """ "k/n (p%)[, d loops]" of a key-fact or out-of-scope summary; "-" without one."""
    if not summary or not summary["of"]:
        return "-"
    loops, declined = summary["degenerate"], summary.get("declined", 0)
    text = f"{summary[key]}/{summary['of']} ({summary[key] / summary['of']:.0%})"
    text += f", {loops} loop{'s' if loops > 1 else ''}" if loops else ""
    return text + (f", {declined} declined" if declined and key == "correct" else "")


def _metric_rows(report):
    """(label, base text, fine-tuned text) for the summary table and the console."""
    b, f, n, split = report["base"], report["fine_tuned"], report["data"]["count"], report["split"]
    g = report["general_text"]
    rows = [
        ("loss", f"{b['loss']:.4f}", f"{f['loss']:.4f}"),
        ("perplexity", f"{b['perplexity']:.2f}", f"{f['perplexity']:.2f}"),
        ("exact match", f"{b['exact_count']}/{n}", f"{f['exact_count']}/{n}"),
        ("token F1", f"{b['token_f1']:.3f}", f"{f['token_f1']:.3f}"),
        ("chrF", f"{b['chrf']:.1f}", f"{f['chrf']:.1f}"),
        (f"key facts, {split}", _pct(b["key_facts"][split]), _pct(f["key_facts"][split])),
        ("key facts, paraphrases", _pct(b["key_facts"]["paraphrases"]), _pct(f["key_facts"]["paraphrases"])),
        ("invents, out of scope", _pct(b["out_of_scope"], "invented"), _pct(f["out_of_scope"], "invented")),
    ]
    if g:
        flag = " FORGETTING" if g["flagged"] else ""
        change = f" ({g['ratio'] - 1:+.1%}, limit +{g['limit'] - 1:.0%}){flag}"
        rows.append(
            (
                "general-text perplexity",
                f"{b['general_text']['perplexity']:.2f}",
                f"{f['general_text']['perplexity']:.2f}{change}",
            )
        )
    return rows


def console(report):
    lines = [f"{report['split']} ({report['data']['count']} conversations)   base -> fine-tuned"]
    lines += [f"  {label:24} {b} -> {f}" for label, b, f in _metric_rows(report)]
    missing = [name for name in SET_TITLES if name not in report["eval_sets"]]
    if missing:
        lines.append(
            f"  (no {' or '.join(missing)} set: make data writes DATA/eval/ from RAW/eval/; see README)"
        )
    return "\n".join(lines)


def _cell(text):
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _mark(judgement, out_of_scope=False):
    if judgement is None:
        return ""
    if judgement["degenerate"]:
        return " **[loop ✗]**"
    if out_of_scope:
        return " [declines ✓]" if judgement["ok"] else " **[invents ✗]**"
    if judgement["ok"]:
        return " [facts ✓]"
    if judgement.get("declined"):
        return " **[declines an answerable question ✗]**"
    return " **[missing: " + _cell(", ".join(judgement["missing"])) + " ✗]**"


def _facts_cell(named):
    return "; ".join(" / ".join(fact) for fact in named or [])


def _asked(conversation):
    """A follow-up shown with its earlier questions: «first» → second."""
    users = [m["content"] for m in conversation if m["role"] == "user"]
    return " → ".join(f"«{u}»" for u in users[:-1]) + (" → " if len(users) > 1 else "") + users[-1]


def markdown(report):
    n = report["data"]["count"]
    lines = [
        f"# Evaluation of `{report['name']}` on {report['split']} ({n} conversations)",
        "",
        f"Base model `{report['base_model']}`; greedy answers, at most {report['max_tokens']} tokens, the run's "
        f"system prompt on both; fine-tuned: the run's {report['adapter']['source'] or 'shipped'} adapter "
        f"(step {report['adapter']['step']}).",
        "",
        "| metric | base | fine-tuned |",
        "|---|---|---|",
        *(f"| {label} | {b} | {f} |" for label, b, f in _metric_rows(report)),
        "",
        "## Rules",
        "",
        *(f"- {rule}" for rule in report["rules"].values()),
        "",
        "## Examples",
        "",
        "| question | reference | base | fine-tuned |",
        "|---|---|---|---|",
    ]
    for ex in report["examples"]:
        mark = " ✓" if ex["fine_tuned_scores"]["exact"] else ""
        lines.append(
            f"| {_cell(ex['question'])} | {_cell(ex['reference'])} | {_cell(ex['base'])}{_mark(ex['base_key_facts'])} | "
            f"{_cell(ex['fine_tuned'])}{mark}{_mark(ex['fine_tuned_key_facts'])} |"
        )
    lines += _set_sections(report) + _general_section(report)
    return "\n".join(lines) + "\n"


def _set_sections(report):
    lines = []
    for name, title in SET_TITLES.items():
        lines += ["", f"## {title}", ""]
        data = report["eval_sets"].get(name)
        if not data:
            lines.append(
                f"No {name} set (make data writes DATA/eval/{name}.jsonl from RAW/eval/{name}.jsonl)."
            )
            continue
        oos = name == "out_of_scope"
        lines += [
            f"`{data['path']}`, {data['count']} questions.",
            "",
            "| question | facts | base | fine-tuned |",
            "|---|---|---|---|",
        ]
        for ex in data["examples"]:
            lines.append(
                f"| {_cell(_asked(ex['conversation']))} | {_cell(_facts_cell(ex['facts']))} | "
                f"{_cell(ex['base'])}{_mark(ex['base_judgement'], oos)} | "
                f"{_cell(ex['fine_tuned'])}{_mark(ex['fine_tuned_judgement'], oos)} |"
            )
    return lines


def _general_section(report):
    g = report["general_text"]
    lines = ["", "## General text", ""]
    if not g:
        return lines + ["No general text (data/general/*.txt): the forgetting check did not run."]
    b, f = report["base"]["general_text"], report["fine_tuned"]["general_text"]
    verdict = (
        "**flagged: the fine-tuned model forgot general language**" if g["flagged"] else "within the limit"
    )
    return lines + [
        f"`{g['path']}` ({', '.join(g['files'])}, {g['tokens']} tokens): perplexity {b['perplexity']:.2f} (base) -> "
        f"{f['perplexity']:.2f} (fine-tuned), {g['ratio'] - 1:+.1%} (limit +{g['limit'] - 1:.0%}): {verdict}."
    ]
