"""Data flows one way: each module imports only modules of lower layers (DESIGN.md).

A module may import any module of a strictly lower layer, never one of its own
layer or above. `store`, `ready` and `events` share a layer, so they never import
each other; only `app`, `cli`, `api`, `demo` and `admin` sit above `server`.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "taskserver"

LAYERS: list[set[str]] = [
    {"errors"},
    {"credentials"},
    {
        "models",
        "config",
        "topics",
        "periodic",
        "processes",
        "problems",
        "runtime",
        "tls",
        "jsonints",
        "client",
    },
    {"schema", "auth", "netguard", "attempts"},
    {"store", "ready", "events"},
    {"workers", "options", "sse"},
    {"server", "mercure"},
    {"access", "openapi"},
    {"api", "demo", "add_command"},
    {"app", "admin"},
    {"cli", "__init__", "__main__"},
]


def layer_of(module: str) -> int:
    for number, members in enumerate(LAYERS):
        if module in members:
            return number
    raise AssertionError(f"taskserver/{module}.py is in no layer: add it to LAYERS")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("taskserver."):
            found.add((node.module or "").split(".")[1])
    return found


def test_every_import_points_down() -> None:
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        module = path.stem
        for target in imports_of(path):
            if layer_of(target) >= layer_of(module) and module not in ("__init__", "__main__"):
                wrong.append(f"{module} imports {target}")
    assert wrong == []
