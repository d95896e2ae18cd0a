"""Code that reads in one sitting: no function in core/, train/ or worker/ longer than 80 lines
(the JavaScript's limit is ESLint's max-lines-per-function, examples/express/eslint.config.js)."""

import ast

import pytest

from tests.conftest import ROOT

LIMIT = 80


@pytest.mark.parametrize("package", ["core", "train", "worker"])
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
