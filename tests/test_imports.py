"""The package graph: core <- train, core <- worker, bench -> both. The worker never imports
the training side (it runs where only serving is installed and must not pay for it). No module
imports itself through others: every import is walked, those inside functions included, and a
circle fails with its files and lines."""

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


# --------------------------------------------------------------------------- no circle

PACKAGES = ("core", "train", "worker", "bench", "tests")


def project_modules(root, packages=PACKAGES):
    """{dotted name: path} of every Python file in the packages (a package is its __init__)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def import_edges(name, path, modules):
    """(imported project module, line) for every import in the file, those inside functions
    included: `from a import b` is a.b where that is a module, else a; relative imports resolved."""

    def known(dotted):
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [known(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                )
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in modules else known(base) for a in node.names
            ]
        else:
            continue
        yield from ((t, node.lineno) for t in targets if t and t != name)


def import_cycles(root, packages=PACKAGES):
    """Every circle of the import graph found by a depth-first walk, each as
    ["a (a.py:3)", "b (b.py:7)", "a"]: a imports b at a.py:3, b imports a at b.py:7."""
    modules = project_modules(root, packages)
    graph = {m: {} for m in modules}
    for m, path in modules.items():
        for target, line in import_edges(m, path, modules):
            graph[m].setdefault(target, line)
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                loop = stack[stack.index(t) :] + [t]
                cycles.append(
                    [f"{a} ({modules[a].relative_to(root)}:{graph[a][b]})" for a, b in zip(loop, loop[1:])]
                    + [t]
                )
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_circle_in_the_python_packages():
    cycles = import_cycles(ROOT)
    assert not cycles, "import circles (each module imports the next):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_a_circle_through_a_function_level_or_relative_import_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "c.py").write_text("import os\n\n\ndef g():\n    from ..a import x\n")
    (pkg / "d.py").write_text("from pkg.sub import c\n")  # into the circle, not part of it
    assert import_cycles(tmp_path, ["pkg"]) == [
        ["pkg.a (pkg/a.py:1)", "pkg.b (pkg/b.py:2)", "pkg.sub.c (pkg/sub/c.py:5)", "pkg.a"]
    ]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert import_cycles(tmp_path, ["pkg"]) == []
