"""The ONNX route's modules use each other's public names only (a private name is free to change)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "normfx"
MODULES = sorted([*(ROOT / "passes" / "onnx").glob("*.py"), *(ROOT / "stats").glob("onnx_*.py")])


def _private_imports(path: Path) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = (node.module or "").rsplit(".", 1)[-1]
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append((module, alias.name))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_private_name_is_imported_from_another_module(path):
    assert MODULES and not _private_imports(path)
