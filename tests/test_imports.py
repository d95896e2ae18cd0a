"""The package graph: core <- train, core <- worker, bench -> both. The worker never imports
the training side (it runs where only serving is installed and must not pay for it)."""

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module or ""


@pytest.mark.parametrize("package", ["core", "worker"])
def test_package_does_not_import_train(package):
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in imported_modules(path)
        if name == "train" or name.startswith("train.")
    ]
    assert not bad, bad


def test_core_imports_neither_worker_nor_bench():
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / "core").rglob("*.py"))
        for name in imported_modules(path)
        if name.split(".")[0] in ("worker", "bench")
    ]
    assert not bad, bad


def test_a_running_worker_process_has_loaded_no_training_module():
    code = (
        "import sys, worker.__main__, worker.engine, worker.loading, worker.cli; "
        "print(sorted(m for m in sys.modules if m == 'train' or m.startswith('train.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
