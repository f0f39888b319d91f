"""design.md §3 rule 1: the sans-IO layers import nothing that waits, reads the clock or draws randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncio", "socket", "threading", "time", "random", "secrets", "os", "select", "fcntl", "subprocess"}
SANS_IO_ROOTS = ("protocol", "dataplane")


def _sans_io_files() -> list[Path]:
    files: list[Path] = []
    for top in SANS_IO_ROOTS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if (ROOT / "dataplane" / "io") in path.parents:
                continue
            files.append(path)
    return files


def _imported_modules(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_there_are_sans_io_modules_to_check() -> None:
    assert len(_sans_io_files()) >= 3


@pytest.mark.parametrize("path", _sans_io_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [name for name in _imported_modules(tree) if name.split(".")[0] in FORBIDDEN]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; only drivers (dataplane/io, agent, lab) may"


@pytest.mark.parametrize("path", _sans_io_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_module_imports_no_driver_layer(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [n for n in _imported_modules(tree) if n.split(".")[0] in {"agent", "lab"} or n.startswith("dataplane.io")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
