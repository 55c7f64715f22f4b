"""Opening a SQLite database: migrations, then recovery of what a dead process left.

Both run on the writer's connection in ``SqliteBackend.open``, before the writer
starts, each migration and the recovery in a transaction of its own.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from ... import lifecycle
from ...models import Event, EventType, Task
from ..payload import dumps, event_json
from . import schema as sql
from .attempts import AttemptJournal

log = logging.getLogger(__name__)


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Run the migrations ``db`` has not had; refuse a schema newer than this code."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(sql.MIGRATIONS):
        raise RuntimeError(
            f"{path} has schema version {version}, newer than this taskserver knows "
            f"({len(sql.MIGRATIONS)}); upgrade taskserver"
        )
    for number, script in enumerate(sql.MIGRATIONS[version:], start=version + 1):
        db.execute("BEGIN IMMEDIATE")
        for statement in filter(str.strip, script.split(";")):
            db.execute(statement)
        db.execute(f"PRAGMA user_version = {number}")
        db.execute("COMMIT")
        log.info("migrated %s to schema version %d", path, number)


def recover(
    db: sqlite3.Connection,
    journal: AttemptJournal | None,
    next_event_id: Callable[[], int],
    now: float,
) -> tuple[int, int]:
    """Return tasks a dead process left running to ``queued``; fail those out of attempts.

    Left running: a task whose ``running`` row committed, and a ``queued`` one
    whose start is in the attempts journal with a ``started`` event that never
    committed (the process died within the commit window). Either way the
    attempt counts, so a task that kills the process every time ends ``failed``
    after ``max_attempts`` (``lifecycle.recovered_state``). One transaction with
    its events, ids from ``next_event_id``; the caller empties the journal after
    it. Returns how many went back to ``queued`` and how many ``failed``.
    """
    rows: list[tuple[int, int, int]] = db.execute(sql.SELECT_RUNNING).fetchall()
    if journal is not None:
        committed = int(db.execute(sql.SELECT_HIGHEST_ID.format(table="events")).fetchone()[0])
        started: dict[int, int] = {}
        for task_id, attempt, event_id in journal.read():
            if event_id > committed:  # event ids commit in order
                started[task_id] = max(attempt, started.get(task_id, 0))
        if started:
            queued = db.execute(sql.SELECT_QUEUED_BY_IDS, (dumps(list(started)),))
            rows += [
                (task_id, started[task_id], max_attempts)
                for task_id, attempts, max_attempts in queued
                if attempts < started[task_id]
            ]
    if not rows:
        return 0, 0
    requeued = failed = 0
    db.execute("BEGIN IMMEDIATE")
    extra: dict[str, Any]
    for task_id, attempts, max_attempts in rows:
        state = lifecycle.recovered_state(attempts, max_attempts)
        stub = Task(
            id=task_id,
            data=None,
            max_attempts=max_attempts,
            timeout=None,
            state=state,
            created_at=now,
            updated_at=now,
            attempts=attempts,
        )
        if state is lifecycle.FAILED:
            failed += 1
            error = (
                f"the server process died during attempt {attempts} of {max_attempts}"
                " (killed or crashed); no attempts are left"
            )
            db.execute(sql.RECOVER_FAILED, (attempts, error, now, now, task_id))
            type_, extra = EventType.FAILED, {"error": error}
        else:
            requeued += 1
            db.execute(sql.RECOVER_QUEUED, (attempts, now, now, task_id))
            type_, extra = EventType.QUEUED, {"recovered": True}
        event = Event(next_event_id(), task_id, type_, event_json(stub, type_, extra, now))
        db.execute(sql.INSERT_EVENT, sql.event_row(event, now))
    db.execute("COMMIT")
    log.warning(
        "recovered tasks left running: %d re-queued, %d failed (no attempts left)",
        requeued,
        failed,
    )
    return requeued, failed
