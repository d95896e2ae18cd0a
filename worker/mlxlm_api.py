"""The one place the worker touches mlx-lm's Python API (pinned: mlx-lm 0.32.2).

Every mlx-lm name the worker uses is listed in REQUIRED and imported here; the rest of the
worker imports them from this module. When an mlx-lm upgrade renames or removes one (the
stop-sequence helpers were renamed after 0.32.2), importing this module fails at once with an
ImportError that names every missing name and where it was expected, instead of an
AttributeError in the middle of a request. tests/test_mlxlm_api.py holds the list to that.
"""

import importlib

PINNED = "0.32.2"

# (module, name): what the worker needs from mlx-lm.
REQUIRED = (
    ("mlx_lm.generate", "BatchGenerator"),
    ("mlx_lm.generate", "StopSequences"),
    ("mlx_lm.generate", "make_stop_sequences"),
    ("mlx_lm.models.cache", "KVCache"),
    ("mlx_lm.models.cache", "LRUPromptCache"),
    ("mlx_lm.models.cache", "can_trim_prompt_cache"),
    ("mlx_lm.models.cache", "trim_prompt_cache"),
    ("mlx_lm.sample_utils", "apply_min_p"),
    ("mlx_lm.sample_utils", "apply_top_k"),
    ("mlx_lm.sample_utils", "apply_top_p"),
    ("mlx_lm.sample_utils", "make_logits_processors"),
    ("mlx_lm.sample_utils", "make_sampler"),
    ("mlx_lm.utils", "DEFAULT_ALLOW_PATTERNS"),
    ("mlx_lm.utils", "hf_repo_to_path"),
    ("mlx_lm.utils", "load_tokenizer"),
    ("mlx_lm", "load"),
)


def missing_names(required=REQUIRED):
    """The 'module.name' entries of `required` that the installed mlx-lm lacks."""
    missing = []
    for module_name, name in required:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(f"{module_name}.{name} (module not importable)")
            continue
        if not hasattr(module, name):
            missing.append(f"{module_name}.{name}")
    return missing


def installed_version():
    try:
        return importlib.import_module("mlx_lm").__version__
    except Exception:
        return "unknown"


def check(required=REQUIRED):
    """Raise ImportError naming every missing mlx-lm name (none missing: return None)."""
    missing = missing_names(required)
    if missing:
        raise ImportError(
            f"worker/mlxlm_api.py: the installed mlx-lm {installed_version()} lacks "
            f"{', '.join(missing)} (the worker was written against mlx-lm {PINNED}; "
            f"update worker/mlxlm_api.py for the new names)"
        )


check()

from mlx_lm.generate import BatchGenerator, StopSequences, make_stop_sequences  # noqa: E402
from mlx_lm.models.cache import (  # noqa: E402
    KVCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import (  # noqa: E402
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, hf_repo_to_path, load_tokenizer  # noqa: E402


def no_stop_sequences():
    """A stop-sequence set that never matches (generation ends by max_tokens or cancel)."""
    return StopSequences()


def eos_stop_sequences(tokenizer):
    """Stop at any of the tokenizer's end-of-sequence tokens."""
    return make_stop_sequences(tokenizer)


__all__ = [
    "BatchGenerator",
    "KVCache",
    "LRUPromptCache",
    "can_trim_prompt_cache",
    "trim_prompt_cache",
    "apply_min_p",
    "apply_top_k",
    "apply_top_p",
    "make_logits_processors",
    "make_sampler",
    "DEFAULT_ALLOW_PATTERNS",
    "hf_repo_to_path",
    "load_tokenizer",
    "no_stop_sequences",
    "eos_stop_sequences",
    "check",
    "missing_names",
    "REQUIRED",
]
