"""Every index earns its keep, and no query of the server reads a whole table.

``EXPLAIN QUERY PLAN`` of each statement the SQLite backend runs (the named
constants of ``storage/sqlite/schema.py``) on the migrated schema: every index
the migrations leave is used by some statement (an unused one only costs the
hot path its upkeep: each insert and state change writes it), and the ones
that wait on a due time, purge, or look up keys seek their partial index
instead of reading every row of a state (the planner has no ANALYZE
statistics, so it is told: ``INDEXED BY``).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import pytest

from taskserver.storage.sqlite import schema as sql

#: Statements that may read a whole table or index: they run once at start or on demand.
WHOLE = {"COUNT_BY_STATE", "SELECT_SCHEDULES", "TRIM_EVENTS_BY_AGE"}


def _db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    for migration in sql.MIGRATIONS:
        db.executescript(migration)
    return db


def _statements() -> Iterator[tuple[str, str]]:
    for name in dir(sql):
        text = getattr(sql, name)
        if name.endswith("_PREFIX") or not (name.isupper() and isinstance(text, str)):
            continue  # a prefix is planned below, with its rows
        if re.match(r"(SELECT|UPDATE|DELETE)", text):
            text = text.replace("{states}", "'succeeded'").replace("{table}", "tasks")
            yield name, text.replace("{index}", sql.PURGE_BY_AGE).replace("{among}", "")
    yield "update_many", sql.update_many([tuple(range(14))])[0][0]


def _plan(db: sqlite3.Connection, text: str) -> list[str]:
    rows = db.execute(f"EXPLAIN QUERY PLAN {text}", [1] * text.count("?")).fetchall()
    return [str(row[3]) for row in rows]


def test_every_index_is_used_by_some_statement() -> None:
    db = _db()
    indexes = {
        str(name)
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }
    used = {
        match
        for _, text in _statements()
        for line in _plan(db, text)
        for match in re.findall(r"INDEX (\w+)", line)
    }
    assert indexes - used == set(), "indexes no statement uses (drop them in a migration)"


@pytest.mark.parametrize(("name", "text"), list(_statements()))
def test_no_statement_scans_a_table(name: str, text: str) -> None:
    lines = _plan(_db(), text)
    scans = [line for line in lines if re.match(r"SCAN (tasks|events)\b", line)]
    if name not in WHOLE:
        assert scans == [], f"{name} reads a whole table: {lines}"


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("SELECT_NEXT_DUE", "tasks_due"),
        ("SELECT_DUE", "tasks_due"),
        ("PURGE_TASKS", "tasks_ended"),
        ("PURGE_TASK_EVENTS", "tasks_ended"),
        ("SELECT_ACTIVE_UNIQUE", "tasks_unique"),
        ("SELECT_RECENT_UNIQUE", "tasks_unique"),
        ("SELECT_GROUP_HEADS", "tasks_group"),
        ("SELECT_QUEUED_PAGE", "tasks_ready"),
    ],
)
def test_the_partial_indexes_are_sought(name: str, index: str) -> None:
    text = dict(_statements())[name]
    assert any(f"INDEX {index}" in line for line in _plan(_db(), text)), _plan(_db(), text)
