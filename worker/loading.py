"""Model, adapter and metadata loading for the worker.

With an adapter (models/NAME written by training), models/NAME/metadata.json gives the base
model, the chat template, the system prompt and the generation defaults, so the worker
formats prompts exactly as training did. Without one, the defaults come from
train.config.DEFAULTS["generation"].

Only safetensors are loaded (mlx_lm.load reads model*.safetensors, the adapter is
adapters.safetensors), trust_remote_code is off, and nothing a request says ever reaches
this module.
"""

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from train import paths
from train.config import DEFAULTS

METADATA_FORMAT = 1
ADAPTER_FILE = "adapters.safetensors"     # the name mlx_lm.load_adapters reads
GENERATION_KEYS = tuple(DEFAULTS["generation"])


class LoadError(Exception):
    """A problem with the model or adapter given on the command line (exit 2)."""


@dataclass
class Settings:
    model: str                                 # as given (--model or metadata base_model)
    model_path: str                            # what mlx_lm.load received
    adapter: Optional[str] = None              # as given on the command line
    adapter_path: Optional[str] = None
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = None
    generation: dict = field(default_factory=lambda: copy.deepcopy(DEFAULTS["generation"]))
    max_seq_length: Optional[int] = None
    metadata: Optional[dict] = None


def read_metadata(adapter_dir):
    """models/NAME/metadata.json, checked against the contract; raises LoadError."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LoadError(f"adapter folder not found: {adapter_dir}")
    meta_file = adapter_dir / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{meta_file}: missing (an adapter folder is written by training)") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"{meta_file}: unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise LoadError(f"{meta_file}: expected a JSON object")
    if meta.get("format") != METADATA_FORMAT:
        raise LoadError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected {METADATA_FORMAT})")
    if not isinstance(meta.get("base_model"), str) or not meta["base_model"]:
        raise LoadError(f"{meta_file}: base_model must be a non-empty string")
    for key in ("chat_template", "system_prompt"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise LoadError(f"{meta_file}: {key} must be a string or null")
    gen = meta.get("generation", {})
    if not isinstance(gen, dict):
        raise LoadError(f"{meta_file}: generation must be an object")
    for key, value in gen.items():
        if key in GENERATION_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise LoadError(f"{meta_file}: generation.{key} must be a number")
    msl = meta.get("max_seq_length")
    if msl is not None and (isinstance(msl, bool) or not isinstance(msl, int) or msl < 2):
        raise LoadError(f"{meta_file}: max_seq_length must be an integer >= 2")
    adapter_file = meta.get("adapter_file", ADAPTER_FILE)
    if adapter_file != ADAPTER_FILE:
        raise LoadError(f"{meta_file}: adapter_file must be {ADAPTER_FILE!r} (got {adapter_file!r})")
    for name in ("adapter_config.json", ADAPTER_FILE):
        if not (adapter_dir / name).is_file():
            raise LoadError(f"{adapter_dir / name}: missing")
    return meta


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


def settings_for(model=None, adapter=None, system_prompt=None):
    """Everything the command line and metadata.json decide, before loading any weights."""
    if adapter:
        adapter_path = _local_or_id(adapter)
        meta = read_metadata(adapter_path)
        name, model_path = resolve_base(meta, model)
        generation = copy.deepcopy(DEFAULTS["generation"])
        generation.update({k: v for k, v in meta.get("generation", {}).items() if k in GENERATION_KEYS})
        return Settings(
            model=name, model_path=model_path, adapter=adapter, adapter_path=adapter_path,
            system_prompt=system_prompt if system_prompt is not None else meta.get("system_prompt"),
            chat_template=meta.get("chat_template"), generation=generation,
            max_seq_length=meta.get("max_seq_length"), metadata=meta,
        )
    if not model:
        raise LoadError("give --model (a base model) or --adapter (models/NAME)")
    return Settings(model=model, model_path=_local_or_id(model), system_prompt=system_prompt)


def load(settings):
    """(model, tokenizer, config) for these settings, with the chat template set."""
    from mlx_lm import load as mlx_load   # mlx after `import train` (fast BLAS)

    try:
        model, tokenizer, config = mlx_load(
            settings.model_path,
            tokenizer_config={"trust_remote_code": False},
            adapter_path=settings.adapter_path,
            return_config=True,
            trust_remote_code=False,
        )
    except Exception as e:
        raise LoadError(f"cannot load model {settings.model_path!r}"
                        f"{' with adapter ' + repr(settings.adapter_path) if settings.adapter_path else ''}: "
                        f"{type(e).__name__}: {e}") from e
    if settings.chat_template:
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        hf.chat_template = settings.chat_template
    return model, tokenizer, config


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
