"""The codec stays sans-I/O: no module under ferryman/pgwire imports networking or the shell."""

from __future__ import annotations

import ast
from pathlib import Path

import ferryman.pgwire

FORBIDDEN = ("asyncio", "socket", "ssl", "selectors", "ferryman.proxy")
PGWIRE_DIR = Path(ferryman.pgwire.__file__).parent


def _imported_modules(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _is_forbidden(module: str) -> bool:
    return any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN)


def test_pgwire_imports_no_io_modules() -> None:
    sources = sorted(PGWIRE_DIR.rglob("*.py"))
    assert len(sources) >= 8  # the walk really found the package
    offenders = {
        f"{path.relative_to(PGWIRE_DIR)}: {module}"
        for path in sources
        for module in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if _is_forbidden(module)
    }
    assert not offenders, f"pgwire must stay sans-I/O: {sorted(offenders)}"


def test_checker_catches_forbidden_imports() -> None:
    tree = ast.parse(
        "import ssl\nfrom asyncio import streams\nimport socket as s\nfrom ferryman.proxy import x"
    )
    assert [m for m in _imported_modules(tree) if _is_forbidden(m)] == [
        "ssl",
        "asyncio",
        "asyncio.streams",
        "socket",
        "ferryman.proxy",
        "ferryman.proxy.x",
    ]
    assert not _is_forbidden("sslib")


def test_public_names_are_exported() -> None:
    for name in ferryman.pgwire.__all__:
        assert hasattr(ferryman.pgwire, name), name
