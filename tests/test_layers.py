"""Data flows one way: each module imports only modules of lower layers (DESIGN.md).

Two rules. Folders first: the top-level base (errors, models, lifecycle, config,
problem+json, the HTTP client) < ``storage/`` < ``runtime/`` < ``push/`` < the
``TaskServer`` facade < ``web/`` < the entry points (cli, admin, ``__init__``); a
module never imports a folder above its own. Then modules: a module may import
any module of a strictly lower layer, never one of its own layer or above.
And only ``storage/`` knows SQL: nothing outside it imports a database driver.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "taskserver"

LAYERS: list[set[str]] = [
    {"errors", "runtime", "push", "web"},  # the three folders' __init__ hold no code
    {"credentials"},
    {
        "models",
        "measure",
        "config",
        "push.topics",
        "push.subscription",
        "push.directory",
        "push.origins",
        "runtime.periodic",
        "runtime.processes",
        "problems",
        "runtime.tuning",
        "web.tls",
        "web.jsonints",
        "client",
        "storage.sqlite.attempts",
        "storage.sqlite.writer",
    },
    {"lifecycle", "storage.intents", "storage.payload", "web.connbound", "runtime.context"},
    {"storage.rows"},
    {
        "storage.backend",
        "storage.sqlite.schema",
        "storage.postgres.schema",
        "storage.postgres.node",
        "push.jws",
        "web.netguard",
    },
    {
        "storage.batching",
        "storage.postgres.reads",
        "storage.postgres.claims",
        "storage.sqlite.reads",
        "storage.sqlite.recovery",
        "storage.sqlite.snapshot",
    },
    {"storage.postgres.writes", "storage.postgres.subscribers"},
    {"storage.engine", "storage.sqlite.backend", "storage.postgres.backend"},
    {"storage.sqlite", "storage.postgres"},
    {"storage.store"},
    {"storage"},
    {
        "runtime.ready",
        "runtime.waiting",
        "runtime.counts",
        "runtime.tally",
        "runtime.history",
        "push.fanout",
    },
    {"runtime.workers", "runtime.options", "push.sse"},
    {"runtime.shared"},
    {"runtime.enqueue", "runtime.outcomes", "runtime.control"},
    {"runtime.maintenance", "runtime.bulk"},
    {"server", "push.mercure"},
    {"web.exposure"},
    {"web.openapi_schemas"},
    {"web.access", "web.openapi", "web.metrics", "web.forwarded"},
    {"web.http"},
    {"web.operate", "web.dashboard"},
    {"web.api", "web.demo", "web.logs", "add_command", "queues_command"},
    {"web.app", "admin"},
    {"cli", "__init__", "__main__", "netguard"},  # netguard: the old path, re-exported
]

#: The rank of each folder; a top-level module's rank is in TOP.
FOLDERS = {"storage": 1, "runtime": 2, "push": 3, "web": 5}
TOP = {
    **dict.fromkeys(
        (
            "errors",
            "credentials",
            "models",
            "measure",
            "lifecycle",
            "config",
            "problems",
            "client",
        ),
        0,
    ),
    "server": 4,
    **dict.fromkeys(
        ("cli", "admin", "add_command", "queues_command", "__init__", "__main__", "netguard"), 6
    ),
}
#: Database drivers: only storage/ may import them.
DRIVERS = {"sqlite3", "aiosqlite", "asyncpg"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int:
    for number, members in enumerate(LAYERS):
        if module in members:
            return number
    raise AssertionError(f"taskserver/{module} is in no layer: add it to LAYERS")


def rank_of(module: str) -> int:
    head = module.split(".")[0]
    if head in FOLDERS:
        return FOLDERS[head]
    assert module in TOP, f"taskserver/{module}.py has no folder rank: add it to TOP"
    return TOP[module]


def imports_of(module: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """The package modules ``module`` imports (dotted, below ``taskserver``), and the
    top-level names of everything else it imports."""
    inside: set[str] = set()
    outside: set[str] = set()
    package = list(path.relative_to(PACKAGE).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("taskserver."):
                    inside.add(alias.name.removeprefix("taskserver."))
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("taskserver"):
                target = (node.module or "").removeprefix("taskserver").lstrip(".")
            else:
                outside.add((node.module or "").split(".")[0])
                continue
            for alias in node.names:  # ``from .web import api`` imports the module web.api
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in known:
                    inside.add(sub)
                elif target:
                    inside.add(target)
    return inside - {""}, outside


def test_every_import_points_down() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        if module in ("__init__", "__main__"):
            continue
        for target in imports_of(module, path, known)[0]:
            if layer_of(target) >= layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_folders_point_down() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        for target in imports_of(module, path, known)[0]:
            if target in FOLDERS:
                continue
            if rank_of(target) > rank_of(module):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_only_storage_imports_a_database_driver() -> None:
    known = modules()
    wrong = []
    for module, path in known.items():
        if rank_of(module) == FOLDERS["storage"]:
            continue
        drivers = imports_of(module, path, known)[1] & DRIVERS
        wrong += [f"{module} imports {driver}" for driver in sorted(drivers)]
    assert wrong == []
