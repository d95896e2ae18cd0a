"""The worker reaches mlx-lm only through worker/mlxlm_api.py; the names it needs exist."""

import ast
from pathlib import Path

import pytest

from worker import mlxlm_api

WORKER = Path(__file__).resolve().parents[1] / "worker"


def test_installed_mlx_lm_has_every_name_the_worker_uses():
    missing = mlxlm_api.missing_names()
    assert not missing, f"the installed mlx-lm lacks: {', '.join(missing)} (update worker/mlxlm_api.py)"


def test_a_missing_name_fails_loudly_naming_it():
    required = mlxlm_api.REQUIRED + (("mlx_lm.generate", "NoSuchStopThing"),)
    with pytest.raises(ImportError, match=r"lacks mlx_lm\.generate\.NoSuchStopThing \(the worker was"):
        mlxlm_api.check(required)


# The package itself (mlx_lm.load, listed in REQUIRED; mlx_lm.__version__) may be imported
# where the model is loaded; no submodule outside the adapter.
TOP_LEVEL_ONLY = {"loading.py", "__main__.py"}


def test_worker_imports_mlx_lm_only_through_the_adapter():
    for path in WORKER.glob("*.py"):
        if path.name == "mlxlm_api.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad = [
                n
                for n in names
                if n.startswith("mlx_lm.") or (n == "mlx_lm" and path.name not in TOP_LEVEL_ONLY)
            ]
            assert not bad, f"{path.name}:{node.lineno} imports {bad[0]} directly; use worker/mlxlm_api.py"
