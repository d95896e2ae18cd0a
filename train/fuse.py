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
validation set (train/fuse_check.py): mean answer loss of each, max/mean absolute logit
difference on --samples conversations (next to the adapter-vs-base difference, the size of the
fine-tune) and how many greedy answers agree. Printed, and written to models/NAME/fuse_report.json (and a copy in the
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
import json
import sys
from pathlib import Path

from core import atomic, paths
from train import bundle
from train.fuse_check import (
    REPORT,
    build_report,
    describe,
    logit_diff,
    logits_of,
    measure,
    same_prompt_ids,
    set_chat_template,
    summary,
    validation_set,
    write_report,
)

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


# --------------------------------------------------------------------------- what goes beside it


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
