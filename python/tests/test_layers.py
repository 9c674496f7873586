"""ARCHITECTURE "Python package": it knows nothing of SQLite; it only speaks to the binary or
the server. Read from the package's sources: no module imports ``sqlite3`` or names the
store's database file."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eks_upgrade_agent"


def test_the_package_knows_nothing_of_sqlite():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 5, sources
    for path in sources:
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "sqlite3" for n in names), f"{path} imports {names}"
        assert ".sqlite3" not in text, f"{path} names a SQLite file"
