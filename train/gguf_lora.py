"""A run's mlx-lm LoRA adapter as a llama.cpp GGUF-LoRA file, so one base GGUF serves several
adapters (llama.cpp's --lora, llama_adapter_lora_init):

    python -m train.gguf_lora --name NAME [--base]   -> models/NAME/ggml-lora.gguf (+ base-gguf/)

The format is what llama.cpp's convert_lora_to_gguf.py writes for a PEFT adapter: general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and per adapted weight W (llama.cpp's name)
W.lora_a [rank, in] and W.lora_b [out, rank], so that llama.cpp adds (alpha / rank) * B A x.
mlx-lm adds scale * (x A') B' with A' [in, rank], B' [rank, out]: A = A'^T, B = B'^T, and
alpha = scale * rank. q and k get the rotary row order the base GGUF's q/k weights have
(fuse_gguf writes them so), applied to B's rows. LoRA only (not DoRA), llama/mistral models.
`--base` also writes the base model as GGUF into base-gguf/ (make fuse's exporter, unfused).
"""

import argparse
import json
import os
import sys

from core import atomic, paths
from core.metadata import BundleError, read_metadata

LORA_NAME = "ggml-lora.gguf"
BASE_DIR = "base-gguf"


def export(run_dir, config, out_path):
    """Write run_dir's adapter to out_path (atomically); the number of adapted weights."""
    import gguf
    import mlx.core as mx
    import numpy as np
    from mlx_lm.gguf import translate_weight_names

    from train.gguf_check import rotary_order

    adapter = json.loads((run_dir / paths.ADAPTER_CONFIG).read_text())
    if adapter.get("fine_tune_type", "lora") != "lora":
        raise ValueError(f"{run_dir}: a {adapter['fine_tune_type']} adapter; llama.cpp takes LoRA only")
    lora = adapter["lora_parameters"]
    weights = mx.load(str(run_dir / paths.ADAPTERS))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora["scale"]) * int(lora["rank"]))
    names = sorted(k[: -len(".lora_a")] for k in weights if k.endswith(".lora_a"))
    for name in names:
        a = np.array(weights[f"{name}.lora_a"].astype(mx.float32)).T.copy()
        b = np.array(weights[f"{name}.lora_b"].astype(mx.float32)).T.copy()
        if name.endswith("self_attn.q_proj"):
            b = rotary_order(b, heads).copy()
        elif name.endswith("self_attn.k_proj"):
            b = rotary_order(b, kv_heads).copy()
        target = translate_weight_names(f"{name}.weight")
        writer.add_tensor(f"{target}.lora_a", a)
        writer.add_tensor(f"{target}.lora_b", b)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        atomic.fsync_file(tmp)
        os.replace(tmp, out_path)
        atomic.fsync_dir(out_path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return len(names)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.gguf_lora", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="the run: models/NAME")
    p.add_argument(
        "--base", action="store_true", help=f"also write the base model as GGUF into models/NAME/{BASE_DIR}/"
    )
    p.add_argument("--models-dir", help="where run folders are (default models/, or $MODELS_DIR)")
    args = p.parse_args(argv)
    run_dir = paths.run_dir(args.name, args.models_dir)
    try:
        meta = read_metadata(run_dir)
    except BundleError as e:
        print(f"gguf-lora: error: {e}", file=sys.stderr)
        return 2
    from mlx_lm import load

    base = meta.get("base_model_path") or meta["base_model"]
    model, tokenizer, config = load(base, return_config=True)
    n = export(run_dir, config, run_dir / LORA_NAME)
    print(f"gguf-lora: wrote {run_dir / LORA_NAME} ({n} adapted weights)", file=sys.stderr)
    if args.base:
        from train import fuse_gguf

        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = meta.get("chat_template")
        with atomic.staged_dir(run_dir / BASE_DIR) as tmp:
            result = fuse_gguf.export(tmp, base, model, config, tokenizer, meta.get("chat_template"))
            if not result["file"]:
                print(f"gguf-lora: error: the base: {result['note']}", file=sys.stderr)
                return 3
        print(f"gguf-lora: wrote {run_dir / 'base-gguf' / result['file']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
