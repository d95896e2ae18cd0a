"""What a finished run's folder (models/NAME) promises its readers - evaluation, fuse and the
worker - and the identity of the base model it was trained on: metadata.json checked against
the contract, training_config.json, and the base's hash or hub revision. Written by
train/bundle.py; read here by both sides.
"""

import hashlib
import json
from pathlib import Path

from core import paths
from core.config import DEFAULTS
from core.paths import ADAPTER_CONFIG, ADAPTERS

METADATA_FORMAT = 1
GENERATION_KEYS = tuple(DEFAULTS["generation"])


class BundleError(ValueError):
    """A run folder that is missing, incomplete or breaks the metadata contract."""


# --------------------------------------------------------------------------- base model


def resolve_model_path(model):
    """The local folder of a model given as a path or a Hugging Face id (no download)."""
    p = Path(model)
    if p.exists():
        return p.resolve()
    try:
        from mlx_lm.utils import hf_repo_to_path

        return Path(hf_repo_to_path(model))
    except Exception:
        return None


def base_model_hash(model):
    """(hash, method) identifying the base model's weights.

    local folder:  sha256 over the bytes of its *.safetensors files (sorted by name), then
                   config.json - method "sha256:safetensors+config"
    Hugging Face:  the snapshot's commit hash when the model lives in the hub cache -
                   method "hf-revision"; otherwise as for a local folder.
    """
    path = resolve_model_path(model)
    if path is None:
        return None, "unavailable"
    if not Path(model).exists() and path.parent.name == "snapshots":
        return path.name, "hf-revision"
    return folder_hash(path)


def folder_hash(path):
    """(sha256 over the folder's *.safetensors, sorted by name, then config.json, method)."""
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    for f in files:
        if f.is_file():
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest(), "sha256:safetensors+config"


def base_model_identity(model):
    """What metadata.json records about the base: {name, hash, hash_method, revision}; the
    revision is the Hugging Face snapshot (commit) a hub id resolved to, else None."""
    digest, method = base_model_hash(model)
    return {
        "name": model,
        "hash": digest,
        "hash_method": method,
        "revision": digest if method == "hf-revision" else None,
    }


# --------------------------------------------------------------------------- read


def read_metadata(run_dir):
    """models/NAME/metadata.json, checked against the contract (every reader: evaluate, fuse,
    the worker); raises BundleError naming the file and the field."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BundleError(f"adapter folder not found: {run_dir}")
    meta_file = run_dir / paths.METADATA
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{meta_file}: missing (an adapter folder is written by training)") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{meta_file}: unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: expected a JSON object")
    _check_metadata(meta, meta_file)
    for name in (ADAPTER_CONFIG, ADAPTERS):
        if not (run_dir / name).is_file():
            raise BundleError(f"{run_dir / name}: missing")
    return meta


def _check_metadata(meta, meta_file):
    if meta.get("format") != METADATA_FORMAT:
        raise BundleError(
            f"{meta_file}: unsupported format {meta.get('format')!r} (expected {METADATA_FORMAT})"
        )
    if not isinstance(meta.get("base_model"), str) or not meta["base_model"]:
        raise BundleError(f"{meta_file}: base_model must be a non-empty string")
    for key in ("chat_template", "system_prompt", "base_model_revision", "base_model_hash"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise BundleError(f"{meta_file}: {key} must be a string or null")
    gen = meta.get("generation", {})
    if not isinstance(gen, dict):
        raise BundleError(f"{meta_file}: generation must be an object")
    for key, value in gen.items():
        if key in GENERATION_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BundleError(f"{meta_file}: generation.{key} must be a number")
    msl = meta.get("max_seq_length")
    if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or msl < 2):
        raise BundleError(f"{meta_file}: max_seq_length must be an integer >= 2")
    adapter_file = meta.get("adapter_file", ADAPTERS)
    if adapter_file != ADAPTERS:
        raise BundleError(f"{meta_file}: adapter_file must be {ADAPTERS!r} (got {adapter_file!r})")


def read_run(run_dir):
    """(metadata.json checked, training_config.json) of a finished run."""
    meta = read_metadata(run_dir)
    try:
        train_cfg = json.loads((Path(run_dir) / "training_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise BundleError(f"{e.filename}: missing") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{Path(run_dir) / 'training_config.json'}: unreadable: {e}") from None
    return meta, train_cfg


def base_mismatch(meta, model_path):
    """None when the base at `model_path` is the one the adapter was trained on (or cannot be
    compared), else what differs. Compared as recorded: a hub revision by the snapshot
    folder's name, a folder by the sha256 of its weights and config."""
    want, method = meta.get("base_model_hash"), meta.get("base_model_hash_method")
    path = resolve_model_path(model_path)
    if not want or path is None:
        return None
    if method == "hf-revision":
        have = path.name if path.parent.name == "snapshots" else None
        if have is None:
            return None
        return None if have == want else f"hub revision {have[:12]}, trained on {want[:12]}"
    if method == "sha256:safetensors+config":
        have, _ = folder_hash(path)
        return None if have == want else f"weights sha256 {have[:12]}, trained on {want[:12]}"
    return None
