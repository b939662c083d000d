"""The sans-I/O packages import no I/O: an AST walk over tlshello/ and proxyproto/ (STYLE 2.1).

Covers ``import x``, ``from x import y``, relative imports resolved against the package, and
``importlib.import_module("x")`` / ``__import__("x")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ferryman

PACKAGES = ("tlshello", "proxyproto")
FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "ferryman.proxy")
ALLOWED_FERRYMAN = ("ferryman.errors", *(f"ferryman.{p}" for p in PACKAGES))

SOURCE_ROOT = Path(ferryman.__file__).parent
FILES = sorted(path for package in PACKAGES for path in (SOURCE_ROOT / package).rglob("*.py"))


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def imported_modules(path: Path, root: Path = SOURCE_ROOT) -> list[tuple[int, str]]:
    """Every module name ``path`` imports, with its line; ``root`` is the ferryman package dir."""
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_the_walk_sees_files() -> None:
    assert len(FILES) >= 6
    assert {path.parent.name for path in FILES} == set(PACKAGES)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(SOURCE_ROOT)) for p in FILES])
def test_no_io_imports(path: Path) -> None:
    for lineno, module in imported_modules(path):
        for forbidden in FORBIDDEN:
            assert not _is_under(module, forbidden), f"{path.name}:{lineno} imports {module}"
        if _is_under(module, "ferryman"):
            assert any(_is_under(module, ok) for ok in ALLOWED_FERRYMAN), (
                f"{path.name}:{lineno} imports {module}; only ferryman.errors is allowed"
            )


def test_the_checker_catches_violations(tmp_path: Path) -> None:
    package = tmp_path / "ferryman" / "tlshello"
    package.mkdir(parents=True)
    bad = package / "bad.py"
    bad.write_text(
        "import asyncio\nfrom socket import socket\nimport ssl as s\n"
        "import importlib\nimportlib.import_module('selectors')\n"
    )
    bad.write_text(bad.read_text() + "from ..proxy import relay\n")
    modules = {m for _, m in imported_modules(bad, tmp_path / "ferryman")}
    assert {"asyncio", "socket", "ssl", "selectors", "ferryman.proxy"} <= modules
