"""Merge models/NAME's adapter into its base: a standalone model in models/NAME/fused.

    python -m train.fuse --name NAME [--model M] [--out DIR] [--dequantize] [--no-gguf]
        [--models-dir DIR]

mlx-lm's machinery does the work, as `mlx_lm fuse` does: load the base with the adapter,
replace every adapted layer by its fuse()d linear, save (weights, config, tokenizer). Then a
GGUF file (ggml-model-f16.gguf, for llama.cpp / Ollama) where mlx-lm can convert: llama,
mistral and mixtral models with float weights. A quantized base stays quantized unless
--dequantize, and mlx-lm cannot write GGUF from quantized weights; that, or any failure of
the conversion, is reported and the fused model is kept. Written to a temporary folder and
renamed into place, so models/NAME/fused is whole or absent.
"""

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

from train import atomic, paths

GGUF_NAME = "ggml-model-f16.gguf"
GGUF_MODEL_TYPES = ("llama", "mistral", "mixtral")      # mlx_lm.fuse --export-gguf's list


def log(message):
    print(f"fuse: {message}", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME")
    p.add_argument("--model", help="base model (default: the run's)")
    p.add_argument("--out", help="output folder (default models/NAME/fused)")
    p.add_argument("--dequantize", action="store_true", help="write float weights (and so a GGUF) from a quantized base")
    p.add_argument("--no-gguf", action="store_true", help="skip the GGUF export")
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    args = p.parse_args(argv)
    if args.models_dir:
        paths.MODELS = Path(args.models_dir).resolve()

    run_dir = paths.run_dir(args.name)
    try:
        meta = json.loads((run_dir / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        log(f"error: {run_dir / 'metadata.json'} missing - train first (make train NAME={args.name})")
        return 2
    base = args.model or meta.get("base_model_path") or meta["base_model"]
    out = Path(args.out) if args.out else run_dir / "fused"

    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.gguf import convert_to_gguf
    from mlx_lm.utils import dequantize_model, load, save

    log(f"loading {base} with the adapter in {run_dir}")
    model, tokenizer, config = load(base, adapter_path=str(run_dir), return_config=True)
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]
    fused = [(n, m.fuse(dequantize=args.dequantize)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    log(f"fused {len(fused)} adapted layers")
    if args.dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, base, model, tokenizer, config, donate_model=False)
        gguf_note = None
        if args.no_gguf:
            gguf_note = "skipped (--no-gguf)"
        elif config.get("model_type") not in GGUF_MODEL_TYPES:
            gguf_note = (f"not exported: mlx-lm converts only {', '.join(GGUF_MODEL_TYPES)} models to "
                         f"GGUF, this one is {config.get('model_type')!r}")
        elif config.get("quantization"):
            gguf_note = ("not exported: the base is quantized and mlx-lm writes GGUF only from float "
                         "weights; rerun with --dequantize for float weights and a GGUF")
        else:
            try:
                convert_to_gguf(tmp, dict(tree_flatten(model.parameters())), config, str(tmp / GGUF_NAME))
            except Exception as e:
                (tmp / GGUF_NAME).unlink(missing_ok=True)
                gguf_note = f"failed: {type(e).__name__}: {e} (the fused model is fine)"
        provenance = {
            "fused_from": str(run_dir), "base_model": meta["base_model"],
            "base_model_hash": meta.get("base_model_hash"), "fine_tune_type": meta.get("fine_tune_type"),
            "system_prompt": meta.get("system_prompt"), "generation": meta.get("generation"),
            "dequantized": bool(args.dequantize), "gguf": None if gguf_note else GGUF_NAME,
            "gguf_note": gguf_note,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "fused_from.json").write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n",
                                             encoding="utf-8")
        for f in tmp.iterdir():
            atomic.fsync_file(f)
        atomic.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} (load it with mlx_lm.load({str(out)!r}) or python -m worker --model {out})")
    if gguf_note:
        log(f"GGUF {gguf_note}")
    else:
        log(f"wrote {out / GGUF_NAME}")
    if meta.get("system_prompt"):
        log("note: a fused model carries no system prompt; the worker adds it only with --adapter "
            "(pass the same system prompt when serving the fused model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
