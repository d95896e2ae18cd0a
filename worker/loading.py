"""Model, adapter and metadata loading for the worker.

With an adapter (models/NAME written by training), models/NAME/metadata.json gives the base
model, the chat template, the system prompt and the generation defaults, so the worker
formats prompts exactly as training did. Without one, the defaults come from
core.config.DEFAULTS["generation"].

Only safetensors are loaded (mlx_lm.load reads model*.safetensors, the adapter is
adapters.safetensors), trust_remote_code is off, and nothing a request says ever reaches
this module.
"""

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core import metadata as run_metadata
from core import paths
from core.config import DEFAULTS

METADATA_FORMAT = run_metadata.METADATA_FORMAT
ADAPTER_FILE = run_metadata.ADAPTERS  # the name mlx_lm.load_adapters reads
GENERATION_KEYS = tuple(DEFAULTS["generation"])


class LoadError(Exception):
    """A problem with the model or adapter given on the command line (exit 2)."""


@dataclass
class Settings:
    model: str  # as given (--model or metadata base_model)
    model_path: str  # what mlx_lm.load received
    adapter: str | None = None  # as given on the command line
    adapter_path: str | None = None
    system_prompt: str | None = None
    chat_template: str | None = None
    generation: dict = field(default_factory=lambda: copy.deepcopy(DEFAULTS["generation"]))
    max_seq_length: int | None = None
    metadata: dict | None = None
    revision: str | None = None  # the hub snapshot training used (metadata)
    allow_base_mismatch: bool = False  # load a base other than the trained one


def read_metadata(adapter_dir):
    """models/NAME/metadata.json, checked against the contract (core.metadata.read_metadata,
    the one reader); raises LoadError."""
    try:
        return run_metadata.read_metadata(adapter_dir)
    except run_metadata.BundleError as e:
        raise LoadError(str(e)) from None


def resolve_base(meta, override=None):
    """(name as given, path or HF id for mlx_lm.load): --model, base_model_path, base_model."""
    if override:
        return override, _local_or_id(override)
    given = meta["base_model"]
    local = meta.get("base_model_path")
    if isinstance(local, str) and local and Path(local).is_dir():
        return given, local
    return given, _local_or_id(given)


def _local_or_id(name):
    """A relative path is tried from the current folder, then from the repository root."""
    p = Path(name)
    if p.exists():
        return str(p)
    if not p.is_absolute() and (paths.ROOT / p).exists():
        return str(paths.ROOT / p)
    return name


def settings_for(model=None, adapter=None, system_prompt=None, allow_base_mismatch=None):
    """Everything the command line and metadata.json decide, before loading any weights.
    allow_base_mismatch: None reads WORKER_ALLOW_BASE_MISMATCH=1 from the environment."""
    if allow_base_mismatch is None:
        allow_base_mismatch = os.environ.get("WORKER_ALLOW_BASE_MISMATCH", "") in ("1", "yes", "true")
    if adapter:
        adapter_path = _local_or_id(adapter)
        meta = read_metadata(adapter_path)
        name, model_path = resolve_base(meta, model)
        local = Path(model_path).exists()
        generation = copy.deepcopy(DEFAULTS["generation"])
        generation.update({k: v for k, v in meta.get("generation", {}).items() if k in GENERATION_KEYS})
        return Settings(
            model=name,
            model_path=model_path,
            adapter=adapter,
            adapter_path=adapter_path,
            system_prompt=system_prompt if system_prompt is not None else meta.get("system_prompt"),
            chat_template=meta.get("chat_template"),
            generation=generation,
            max_seq_length=meta.get("max_seq_length"),
            metadata=meta,
            revision=None if local else meta.get("base_model_revision"),
            allow_base_mismatch=bool(allow_base_mismatch),
        )
    if not model:
        raise LoadError("give --model (a base model) or --adapter (models/NAME)")
    return Settings(model=model, model_path=_local_or_id(model), system_prompt=system_prompt)


def load(settings):
    """(model, tokenizer, config) for these settings, with the chat template set."""
    from mlx_lm import load as mlx_load  # mlx after `import core` (fast BLAS)

    check_base(settings)
    try:
        model, tokenizer, config = mlx_load(
            settings.model_path,
            tokenizer_config={"trust_remote_code": False},
            adapter_path=settings.adapter_path,
            return_config=True,
            trust_remote_code=False,
            revision=settings.revision,
        )
    except Exception as e:
        raise LoadError(
            f"cannot load model {settings.model_path!r}"
            f"{' with adapter ' + repr(settings.adapter_path) if settings.adapter_path else ''}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if settings.chat_template:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        hf.chat_template = settings.chat_template
    return model, tokenizer, config


def load_tokenizer(settings):
    """(tokenizer, config) of the model folder alone, chat template set: for an engine that
    brings its own weights (llama.cpp's GGUF), the tokenizer training used; base pin checked."""
    import json

    from worker.mlxlm_api import hf_repo_to_path
    from worker.mlxlm_api import load_tokenizer as mlx_load_tokenizer

    check_base(settings)
    try:
        folder = Path(settings.model_path)
        if not folder.exists():
            folder = Path(hf_repo_to_path(settings.model_path))
        tokenizer = mlx_load_tokenizer(folder, {"trust_remote_code": False})
        config = json.loads((folder / "config.json").read_text())
    except Exception as e:
        raise LoadError(
            f"cannot load the tokenizer of {settings.model_path!r}: {type(e).__name__}: {e}"
        ) from e
    if settings.chat_template:
        getattr(tokenizer, "_tokenizer", tokenizer).chat_template = settings.chat_template
    return tokenizer, config


def check_base(settings):
    """Refuse a base model other than the one the adapter was trained on (metadata.json's
    base_model_hash: the hub revision, or the sha256 of a folder's weights and config),
    unless allow_base_mismatch. A hub id is checked at the pinned revision when it is in
    the local cache (otherwise mlx_lm.load fetches exactly that revision)."""
    if not settings.metadata:
        return
    where = settings.model_path
    if settings.revision:
        where = _cached_snapshot(settings.model_path, settings.revision)
        if where is None:
            return
    problem = run_metadata.base_mismatch(settings.metadata, where)
    if problem is None:
        return
    message = (
        f"the base model {settings.model!r} ({where}) is not the one the adapter "
        f"{settings.adapter!r} was trained on: {problem}. Serve the adapter with the base it "
        "was trained on (--model), or pass --allow-base-mismatch "
        "(WORKER_ALLOW_BASE_MISMATCH=1) to load it anyway"
    )
    if not settings.allow_base_mismatch:
        raise LoadError(message)
    print(f"worker: warning: {message} (allowed)", file=sys.stderr, flush=True)


def _cached_snapshot(repo_id, revision):
    """The hub cache's folder of repo_id at revision, or None when it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        from worker.mlxlm_api import DEFAULT_ALLOW_PATTERNS

        return snapshot_download(
            repo_id, revision=revision, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS
        )
    except Exception:
        return None


def context_length(settings, config):
    """Prompt plus generation may not exceed this: max_seq_length, else the model's window."""
    if settings.max_seq_length:
        return int(settings.max_seq_length)
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config") if isinstance(config, dict) else None
    if isinstance(text, dict):
        value = text.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return None
