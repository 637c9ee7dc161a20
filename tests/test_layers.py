"""The import layers of docs/design.md hold: checked with import-linter and the AST."""

from __future__ import annotations

import ast
import os
from pathlib import Path

from importlinter.cli import lint_imports

import feste

PACKAGE = Path(feste.__file__).parent
ROOT = PACKAGE.parent


def test_import_linter_contracts_are_kept():
    """The contracts in setup.cfg: every module imports only from the layers below it,
    and feste.testing uses nothing of feste but its errors."""
    previous = Path.cwd()
    os.chdir(ROOT)
    try:
        assert lint_imports(config_filename=str(ROOT / "setup.cfg"), no_cache=True) == 0
    finally:
        os.chdir(previous)


def _nested_feste_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else ["(relative)"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name == "(relative)" or name == "feste" or name.startswith("feste."):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    return found


def test_no_feste_module_imports_another_inside_a_function():
    """A function-level import of a feste module would hide a cycle between layers."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found.extend(_nested_feste_imports(path))
    assert found == []
