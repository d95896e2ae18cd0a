"""The check of a fused model against base + adapter (train/fuse.py runs it on the fused model
read back from disk): the run's validation set encoded as training encodes it
(validation_set), what is measured on each model (measure: mean answer loss, logits of a few
conversations, greedy answers; logit_diff, same_prompt_ids for the saved tokenizer), and the
verdict with its report (build_report: --tolerance on the loss, --max-drift on the logits as a
share of the adapter's own effect; summary, printed; write_report, fuse_report.json)."""

import datetime
import json
import math

from core import atomic
from core.prompt import encode_prompt
from train import batches, bundle

REPORT = "fuse_report.json"


def describe(form):
    q = form["quantization"]
    kind = f"{q['bits']}-bit (group {q['group_size']}, {q['mode']})" if q else "float"
    return f"{kind} weights, {form['dtype']}"


# --------------------------------------------------------------------------- measuring


def set_chat_template(tokenizer, meta):
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]


def validation_set(tokenizer, meta, data_file, samples):
    """The run's validation conversations encoded as training encodes them (loss), the first
    `samples` of them as full sequences (logits) and as prompts (greedy answers)."""
    split = batches.read_split(data_file)
    conversations = [m for m in split.conversations if m and m[-1]["role"] == "assistant"]
    if not conversations:
        raise SystemExit(f"fuse: error: no conversations ending with an answer in {data_file}")
    system_prompt = meta.get("system_prompt")
    examples = batches.encode(
        tokenizer, conversations, system_prompt, True, int(meta.get("max_seq_length") or 2048)
    ).examples
    chosen = conversations[: max(samples, 0)]
    references = [m[-1]["content"] for m in chosen]
    longest = max((len(tokenizer.encode(r, add_special_tokens=False)) for r in references), default=0)
    return {
        "path": str(data_file),
        "sha256": split.sha256,
        "count": len(conversations),
        "examples": examples,
        "sample_ids": [ids for ids, _ in examples[: len(chosen)]],
        "prompts": [encode_prompt(tokenizer, m[:-1], system_prompt) for m in chosen],
        "messages": [m[:-1] for m in chosen],
        "system_prompt": system_prompt,
        "texts": [x["content"] for m in chosen for x in m] + ([system_prompt] if system_prompt else []),
        "max_tokens": min(int((meta.get("generation") or {}).get("max_tokens") or 256), longest + 16),
        "batch_size": int(meta.get("batch_size") or 8),
    }


def logits_of(model, ids):
    import mlx.core as mx
    import numpy as np

    logits = model(mx.array([ids]))[0].astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def measure(model, tokenizer, val, meta):
    from train.eval_model import generate_answers

    model.eval()
    loss, ntoks = batches.evaluate_loss(model, val["examples"], val["batch_size"])
    return {
        "loss": loss,
        "answer_tokens": ntoks,
        "logits": [logits_of(model, ids) for ids in val["sample_ids"]],
        "answers": generate_answers(model, tokenizer, val["prompts"], val["max_tokens"]),
    }


def logit_diff(a_list, b_list):
    import numpy as np

    if not a_list:
        return {"max_abs": None, "mean_abs": None, "positions": 0}
    diffs = [np.abs(a - b) for a, b in zip(a_list, b_list)]
    return {
        "max_abs": float(max(d.max() for d in diffs)),
        "mean_abs": float(sum(d.sum() for d in diffs) / sum(d.size for d in diffs)),
        "positions": int(sum(d.shape[0] for d in diffs)),
    }


def same_prompt_ids(fused_tokenizer, val):
    """Does the tokenizer saved with the fused model encode the prompts as the run's did?"""
    return all(
        encode_prompt(fused_tokenizer, m, val["system_prompt"]) == ids
        for m, ids in zip(val["messages"], val["prompts"])
    )


# --------------------------------------------------------------------------- report


def build_report(args, meta, run_dir, base, out, val, form, reference, fused, tokenizer_same):
    diff = logit_diff(fused.pop("logits"), reference.pop("logits"))
    ref_loss, fused_loss = reference["loss"], fused["loss"]
    increase = (fused_loss - ref_loss) / abs(ref_loss) if ref_loss else math.inf
    agree = sum(a == b for a, b in zip(reference["answers"], fused["answers"]))
    vs_base = reference["vs_base"]
    drift = None if diff["mean_abs"] is None else diff["mean_abs"] / max(vs_base["mean_abs"], 1e-6)
    reasons = []
    if not (increase <= args.tolerance):
        reasons.append(
            f"the fused model's validation loss is {fused_loss:.4f} against base + adapter's "
            f"{ref_loss:.4f} ({increase:+.2%}, tolerance {args.tolerance:+.2%})"
        )
    if drift is not None and not (drift <= args.max_drift):
        reasons.append(
            f"the fused model's logits differ from base + adapter's by {drift:.1%} of the adapter's "
            f"own effect (mean abs {diff['mean_abs']:.4g} vs {vs_base['mean_abs']:.4g}; "
            f"at most {args.max_drift:.1%})"
        )
    if not tokenizer_same:
        reasons.append("the tokenizer saved with the fused model encodes the validation prompts differently")
    return {
        "name": meta.get("name"),
        "run": str(run_dir),
        "base_model": base,
        "out": str(out),
        "data": {
            "path": val["path"],
            "sha256": val["sha256"],
            "count": val["count"],
            "samples": len(val["prompts"]),
        },
        "form": form,
        "loss": {
            "base_plus_adapter": ref_loss,
            "fused": fused_loss,
            "relative_increase": increase,
            "answer_tokens": fused["answer_tokens"],
        },
        "logits": {
            "fused_vs_adapter_max_abs": diff["max_abs"],
            "fused_vs_adapter_mean_abs": diff["mean_abs"],
            "adapter_vs_base_max_abs": vs_base["max_abs"],
            "adapter_vs_base_mean_abs": vs_base["mean_abs"],
            "drift": drift,
            "positions": diff["positions"],
        },
        "greedy": {
            "agree": agree,
            "of": len(fused["answers"]),
            "max_tokens": val["max_tokens"],
            "disagreements": [
                {"base_plus_adapter": a, "fused": b}
                for a, b in zip(reference["answers"], fused["answers"])
                if a != b
            ][:5],
        },
        "tokenizer_same": tokenizer_same,
        "check": {
            "tolerance": args.tolerance,
            "max_drift": args.max_drift,
            "passed": not reasons,
            "forced": bool(args.force and reasons),
            "reason": "; ".join(reasons) or None,
        },
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def summary(r):
    lo, lg, g = r["loss"], r["logits"], r["greedy"]
    fmt = lambda x: "n/a" if x is None else f"{x:.4g}"  # noqa: E731
    verdict = (
        "PASS"
        if r["check"]["passed"]
        else ("FAIL (written anyway: --force)" if r["check"]["forced"] else "FAIL")
    )
    return (
        f"fuse check: {describe(r['form'])} vs base + adapter, on {r['data']['path']} "
        f"({r['data']['count']} conversations, {r['data']['samples']} compared logit by logit)\n"
        f"  validation loss       {lo['base_plus_adapter']:.4f} -> {lo['fused']:.4f}  "
        f"({lo['relative_increase']:+.2%}; tolerance {r['check']['tolerance']:+.2%})\n"
        f"  logits max abs diff   {fmt(lg['fused_vs_adapter_max_abs'])}  "
        f"(adapter vs base: {fmt(lg['adapter_vs_base_max_abs'])})\n"
        f"  logits mean abs diff  {fmt(lg['fused_vs_adapter_mean_abs'])}  "
        f"(adapter vs base: {fmt(lg['adapter_vs_base_mean_abs'])}; drift {fmt_pct(lg['drift'])}, "
        f"at most {r['check']['max_drift']:.1%})\n"
        f"  greedy answers        {g['agree']}/{g['of']} identical\n"
        f"  tokenizer             {'same ids' if r['tokenizer_same'] else 'DIFFERENT ids'}\n"
        f"  {verdict}"
    )


def fmt_pct(x):
    return "n/a" if x is None else f"{x:.2%}"


def write_report(run_dir, fused_dir, report):
    text = json.dumps(bundle.finite(report), indent=2, ensure_ascii=False) + "\n"
    atomic.write_text(run_dir / REPORT, text)
    if fused_dir is not None:
        (fused_dir / REPORT).write_text(text, encoding="utf-8")
