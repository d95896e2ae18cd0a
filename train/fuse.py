"""Merge models/NAME's adapter into its base: a standalone model in models/NAME/fused, checked.

    python -m train.fuse --name NAME [--model M] [--out DIR] [--data D]
        [--quantize BITS|base] [--q-group-size N] [--dtype auto|float16|bfloat16|float32]
        [--tolerance REL] [--max-drift FRACTION] [--force] [--samples N] [--no-gguf]
        [--models-dir DIR]

mlx-lm's machinery does the work, as `mlx_lm fuse --dequantize` does: load the base with the
adapter, replace every adapted layer by its fuse()d linear, save (weights, config, tokenizer).
A quantized base (QLoRA) is fused into a de-quantized copy - W + ΔW in float, float16 unless
the base's floats are float32 - because re-quantizing W + ΔW to 4 bits rounds most of the small
ΔW away. --quantize re-quantizes the fused model (group size and mode of the base by default).

Then the fused model, read back from disk, is compared with base + adapter on the run's
validation set: mean answer loss of each, max/mean absolute logit difference on --samples
conversations (next to the adapter-vs-base difference, the size of the fine-tune) and how many
greedy answers agree. Printed, and written to models/NAME/fuse_report.json (and a copy in the
fused folder). The fused model fails the check when its validation loss exceeds base + adapter's
by more than --tolerance (relative, default 1%), or when its logits differ from base + adapter's
by more than --max-drift (default 10%) of the adapter's own effect (mean |fused - adapted| over
mean |adapted - base|: a re-quantized fuse can keep the loss and still lose the fine-tune), or
when its saved tokenizer encodes the prompts differently. Then nothing is written and the exit
status is 3, unless --force.

Last, for a float fused model, a GGUF file for llama.cpp / Ollama (train/fuse_gguf.py): written
and kept only when reading it back verifies it; otherwise the reason is reported. Everything is
written to a temporary folder and renamed into place, so models/NAME/fused is whole or absent.
"""

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

from core import atomic, paths
from core.prompt import encode_prompt
from train import batches, bundle

REPORT = "fuse_report.json"
EXIT_WORSE = 3
DTYPES = ("float16", "bfloat16", "float32")


def log(message):
    print(f"fuse: {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train.fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--out", help="output folder (default models/NAME/fused)")
    p.add_argument("--data", help="folder with valid.jsonl (default: the run's validation data)")
    p.add_argument(
        "--quantize",
        metavar="BITS|base",
        help="re-quantize the fused model to BITS (2,3,4,5,6,8), or 'base' for the base's bits",
    )
    p.add_argument(
        "--q-group-size", type=int, help="group size when re-quantizing (default: the base's, else 64)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto",) + DTYPES,
        default="auto",
        help="float type of the fused weights (auto: float32 for a float32 base, the base's "
        "type for a float base, else float16)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="largest relative increase of the validation loss over base + adapter (default 0.01)",
    )
    p.add_argument(
        "--max-drift",
        type=float,
        default=0.1,
        help="largest mean |logit difference| from base + adapter, as a fraction of the mean |logit "
        "difference| between base + adapter and the base (default 0.1)",
    )
    p.add_argument("--force", action="store_true", help="write the fused model even when it fails the check")
    p.add_argument(
        "--samples",
        type=int,
        default=8,
        help="validation conversations compared logit by logit and by greedy answer (default 8)",
    )
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF export")
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_dir = paths.run_dir(args.name, args.models_dir)
    try:
        meta = bundle.read_metadata(run_dir)
    except bundle.BundleError as e:
        log(f"error: {e} - train first (make train NAME={args.name})")
        return 2
    base = args.model or meta.get("base_model_path") or meta["base_model"]
    out = Path(args.out) if args.out else run_dir / "fused"
    data_file = Path(args.data) / "valid.jsonl" if args.data else Path(meta["data"]["valid"]["path"])
    if not data_file.is_file():
        log(
            f"error: {data_file} missing: the validation data the fused model is checked on "
            f"(--data DIR, or DATA=DIR with make)"
        )
        return 2

    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    log(f"loading {base}")
    model, tokenizer, config = load(base, return_config=True)
    set_chat_template(tokenizer, meta)
    val = validation_set(tokenizer, meta, data_file, args.samples)
    base_logits = [logits_of(model, ids) for ids in val["sample_ids"]]
    load_adapters(model, str(run_dir))
    log(f"base + adapter ({run_dir}): loss and greedy answers on {data_file}")
    reference = measure(model, tokenizer, val, meta)
    reference["vs_base"] = logit_diff(reference["logits"], base_logits)
    del base_logits

    try:
        with atomic.staged_dir(out) as tmp:
            report = fuse_and_check(
                args, meta, run_dir, base, out, tmp, model, tokenizer, config, val, reference
            )
    except Rejected as e:
        report = e.args[0]
        write_report(run_dir, None, report)
        log(
            f"error: the fused model is not base + adapter: {report['check']['reason']}. {out} was not "
            f"written. Fuse without --quantize (make QUANTIZE=) to keep float weights, which keep the "
            f"fine-tune; or loosen the check (--tolerance, --max-drift); or write it anyway with --force "
            f"(make FORCE=1). Report: {run_dir / REPORT}"
        )
        return EXIT_WORSE
    log(f"wrote {out} (load it with mlx_lm.load({str(out)!r}) or python -m worker --model {out})")
    log(f"GGUF: {report['gguf']['note']}")
    if meta.get("system_prompt"):
        log(
            "note: a fused model carries no system prompt; the worker adds it only with --adapter "
            "(pass the same system prompt when serving the fused model)"
        )
    return 0


class Rejected(Exception):
    """The fused model failed the check (and no --force): args[0] is the report."""


def fuse_and_check(args, meta, run_dir, base, out, tmp, model, tokenizer, config, val, reference):
    """Fuse into tmp, compare what was written with base + adapter, GGUF; the report.
    Raises Rejected when the check fails without --force (tmp is then discarded)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import save

    model, config, form = fuse_model(model, config, args)
    log(f"fused {form['fused_layers']} adapted layers -> {describe(form)}; writing {out}")
    save(tmp, base, model, tokenizer, config, donate_model=True)
    del model
    mx.clear_cache()

    fused_model, fused_tokenizer = load(str(tmp))
    set_chat_template(fused_tokenizer, meta)
    log("fused model (read back from disk): loss and greedy answers")
    fused = measure(fused_model, tokenizer, val, meta)
    report = build_report(
        args, meta, run_dir, base, out, val, form, reference, fused, same_prompt_ids(fused_tokenizer, val)
    )
    print(summary(report), flush=True)
    if not report["check"]["passed"]:
        if not args.force:
            raise Rejected(report)
        log(f"warning: {report['check']['reason']}; writing it anyway (--force)")
    report["gguf"] = export_gguf(
        args, tmp, base, fused_model, config, fused_tokenizer, meta, form, val["texts"]
    )
    write_provenance(tmp, meta, run_dir, form, report)
    write_report(run_dir, tmp, report)
    return report


# --------------------------------------------------------------------------- fusing


def fuse_model(model, config, args):
    """LoRA layers -> fused float linears, every other quantized layer de-quantized, floats cast
    to the chosen type; re-quantized only when asked. Returns (model, config, form)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, quantize_model

    base_q = dict(config.get("quantization") or {})
    dtype = choose_dtype(model, bool(base_q), args.dtype)
    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    model.set_dtype(dtype_of(dtype))
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    form = {
        "fused_layers": len(fused),
        "dtype": dtype,
        "base_quantization": {k: base_q[k] for k in ("bits", "group_size", "mode") if k in base_q} or None,
        "quantization": None,
    }
    if args.quantize:
        bits = base_q.get("bits") if args.quantize == "base" else int(args.quantize)
        group_size = args.q_group_size or base_q.get("group_size") or 64
        mode = base_q.get("mode", "affine")
        model, config = quantize_model(model, config, group_size, bits or 4, mode=mode)
        form["quantization"] = {"bits": bits or 4, "group_size": group_size, "mode": mode}
    return model, config, form


def choose_dtype(model, quantized, requested):
    """float32 when every float of the base is float32 (our test models); a float base keeps its
    type; a quantized one (float16 or bfloat16 scales) gets float16, as `mlx_lm fuse` gives."""
    if requested != "auto":
        return requested
    import mlx.core as mx
    from mlx.utils import tree_flatten

    kinds = {
        str(v.dtype).split(".")[-1]
        for k, v in tree_flatten(model.parameters())
        if mx.issubdtype(v.dtype, mx.floating) and "lora_" not in k
    }
    if kinds == {"float32"}:
        return "float32"
    if not quantized and len(kinds) == 1 and kinds <= set(DTYPES):
        return kinds.pop()
    return "float16"


def dtype_of(name):
    import mlx.core as mx

    return getattr(mx, name)


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
    from train.evaluate import generate_answers

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


def write_provenance(tmp, meta, run_dir, form, report):
    provenance = {
        "fused_from": str(run_dir),
        "base_model": meta["base_model"],
        "base_model_hash": meta.get("base_model_hash"),
        "fine_tune_type": meta.get("fine_tune_type"),
        "system_prompt": meta.get("system_prompt"),
        "generation": meta.get("generation"),
        "dtype": form["dtype"],
        "dequantized": bool(form["base_quantization"]) and not form["quantization"],
        "quantization": form["quantization"],
        "check": report["check"],
        "gguf": report["gguf"]["file"],
        "gguf_note": report["gguf"]["note"],
        "created_at": report["created_at"],
    }
    (tmp / "fused_from.json").write_text(
        json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def export_gguf(args, tmp, base, model, config, tokenizer, meta, form, texts):
    from train import fuse_gguf

    if args.no_gguf:
        return {"file": None, "note": "skipped (--no-gguf)"}
    if form["quantization"]:
        return {
            "file": None,
            "note": (
                "not exported: the fused model is re-quantized (--quantize) and mlx-lm writes GGUF only from "
                "float weights; for llama.cpp/Ollama fuse without --quantize and quantize the GGUF with "
                "llama.cpp's llama-quantize"
            ),
        }
    return fuse_gguf.export(tmp, base, model, config, tokenizer, meta.get("chat_template"), texts)


if __name__ == "__main__":
    sys.exit(main())
