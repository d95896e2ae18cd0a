"""Quantized copies of a run's fused GGUF, each with its measured perplexity change.

    python -m train.gguf_quantize --name NAME [--types Q8_0,Q4_K_M] [--samples N]
    (make gguf-quantize NAME=... TYPES=...)

Reads models/NAME/fused/ggml-model-f16.gguf (written by `make fuse`), quantizes it with
llama.cpp's own quantizer (llama_model_quantize, what llama-quantize runs) into
ggml-model-<TYPE>.gguf next to it, and measures each file in llama.cpp: the perplexity of the
run's validation answers (encoded by core/prompt.py as training encodes them, the prompt masked),
against the F16 file's and mlx's fused model's (fuse_report.json). Printed and written to
fused/gguf_quantize.json. A tensor whose rows the type's block does not divide (a K-quant needs
rows of 256) gets the type llama.cpp falls back to, as llama-quantize does; the bits per weight
show it.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from core import atomic, llamacpp, paths
from core.metadata import BundleError, read_metadata
from train import batches
from train.fuse_gguf import GGUF_NAME

DEFAULT_TYPES = ("Q8_0", "Q4_K_M")
REPORT = "gguf_quantize.json"


def log(message):
    print(f"gguf-quantize: {message}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m train.gguf_quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME (fused first: make fuse)")
    p.add_argument(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help=f"comma-separated llama.cpp types (default {','.join(DEFAULT_TYPES)}; any of {', '.join(llamacpp.QUANT_TYPES)})",
    )
    p.add_argument("--samples", type=int, default=64, help="validation conversations measured (default 64)")
    p.add_argument("--data", help="folder with valid.jsonl (default: the run's validation data)")
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    args = p.parse_args(argv)
    args.types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    bad = [t for t in args.types if t not in llamacpp.QUANT_TYPES]
    if bad:
        p.error(f"--types: {', '.join(bad)} not among {', '.join(llamacpp.QUANT_TYPES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    run_dir = paths.run_dir(args.name, args.models_dir)
    fused = run_dir / "fused"
    source = fused / GGUF_NAME
    try:
        llamacpp.require()
        meta = read_metadata(run_dir)
    except (BundleError, llamacpp.NotInstalled) as e:
        log(f"error: {e}")
        return 2
    if not source.is_file():
        log(f"error: {source} missing: run `make fuse NAME={args.name}` first (it writes the F16 GGUF)")
        return 2
    data_file = Path(args.data) / "valid.jsonl" if args.data else Path(meta["data"]["valid"]["path"])
    examples = validation_examples(fused, meta, data_file, args.samples)
    log(f"{len(examples)} validation answers from {data_file}; F16 first, then {', '.join(args.types)}")
    rows = [measure_file(source, "F16", examples)]
    for name in args.types:
        target = fused / f"ggml-model-{name}.gguf"
        start = time.perf_counter()
        quantize_atomically(source, target, name)
        rows.append(measure_file(target, name, examples, quantize_s=time.perf_counter() - start))
    report = build_report(run_dir, source, data_file, rows)
    atomic.write_text(fused / REPORT, json.dumps(report, indent=2) + "\n")
    print(table(report), flush=True)
    log(f"wrote {', '.join(r['file'] for r in rows[1:])} and {fused / REPORT}")
    return 0


def validation_examples(fused, meta, data_file, samples):
    """(ids, answer start) per conversation, as training encodes them (core/prompt.py)."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(fused)
    if meta.get("chat_template"):
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta["chat_template"]
    split = batches.read_split(data_file)
    conversations = [m for m in split.conversations if m and m[-1]["role"] == "assistant"][: max(samples, 1)]
    if not conversations:
        raise SystemExit(f"gguf-quantize: error: no conversations ending with an answer in {data_file}")
    encoded = batches.encode(
        tokenizer, conversations, meta.get("system_prompt"), True, int(meta.get("max_seq_length") or 2048)
    )
    return encoded.examples


def quantize_atomically(source, target, name):
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        llamacpp.quantize(source, tmp, name)
        atomic.fsync_file(tmp)
        os.replace(tmp, target)
        atomic.fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def answer_nll(logits, ids, start):
    """Summed negative log-likelihood of ids[start:] and their count."""
    import numpy as np

    rows = logits[start - 1 : len(ids) - 1].astype(np.float64)
    top = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    picked = rows[np.arange(len(rows)), ids[start:]]
    return float((log_z - picked).sum()), len(rows)


def measure_file(path, name, examples, quantize_s=None):
    n_ctx = max(len(ids) for ids, _ in examples) + 8
    model = llamacpp.load(path, n_ctx=n_ctx)
    total, count = 0.0, 0
    for ids, start in examples:
        nll, n = answer_nll(llamacpp.logits(model, ids), ids, start)
        total, count = total + nll, count + n
    size = path.stat().st_size
    params = llamacpp.n_params(model)
    del model
    return {
        "type": name,
        "file": path.name,
        "bytes": size,
        "bits_per_weight": round(8 * size / params, 2),
        "loss": total / count,
        "perplexity": math.exp(total / count),
        "answer_tokens": count,
        "quantize_s": None if quantize_s is None else round(quantize_s, 1),
    }


def build_report(run_dir, source, data_file, rows):
    f16 = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / f16 - 1
    fuse_report = run_dir / "fuse_report.json"
    mlx_loss = None
    if fuse_report.is_file():
        mlx_loss = (json.loads(fuse_report.read_text()).get("loss") or {}).get("fused")
    return {
        "source": str(source),
        "data": str(data_file),
        "mlx_fused_perplexity": math.exp(mlx_loss) if mlx_loss is not None else None,
        "files": rows,
    }


def table(report):
    lines = [f"{'type':8} {'MB':>8} {'bits/w':>7} {'perplexity':>11} {'vs F16':>8}"]
    for r in report["files"]:
        lines.append(
            f"{r['type']:8} {r['bytes'] / 1e6:8.2f} {r['bits_per_weight']:7.2f} "
            f"{r['perplexity']:11.4f} {100 * r['perplexity_change']:+7.2f}%"
        )
    if report["mlx_fused_perplexity"] is not None:
        lines.append(
            f"(mlx, fused model, float: perplexity {report['mlx_fused_perplexity']:.4f} on the same answers)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
