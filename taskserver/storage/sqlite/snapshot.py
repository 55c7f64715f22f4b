"""Offline reads of a taskserver database, for the admin commands (no server running).

Opens the file read-only (it is never created or migrated), so it is safe
beside a running server: WAL lets it read while the server writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ...models import Task, TaskState
from . import schema as sql


class SnapshotError(Exception):
    """The database file exists but cannot be opened for reading (the driver's message)."""


class Snapshot:
    """Read-only, synchronous access to a taskserver database, for the admin commands.

    Opens the file read-only (it is never created or migrated), so it is safe
    beside a running server: WAL lets it read while the server writes.
    """

    def __init__(self, path: str) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no database at {path}")
        try:
            self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            self._conn.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            raise SnapshotError(str(exc)) from exc

    def close(self) -> None:
        self._conn.close()

    def get_task(self, task_id: int) -> Task | None:
        row = self._conn.execute(sql.SELECT_TASK, (task_id,)).fetchone()
        return sql.task_from_row(row) if row else None

    def list_tasks(self, *, state: TaskState | None, after: int, limit: int) -> list[Task]:
        if state is None:
            rows = self._conn.execute(sql.SELECT_TASKS, (after, limit)).fetchall()
        else:
            rows = self._conn.execute(sql.SELECT_TASKS_BY_STATE, (state, after, limit)).fetchall()
        return [sql.task_from_row(r) for r in rows]

    def count_by_state(self) -> dict[TaskState, int]:
        counts = dict.fromkeys(TaskState, 0)
        for state, count in self._conn.execute(sql.COUNT_BY_STATE):
            counts[TaskState(state)] = int(count)
        return counts

    def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        counts: dict[str, dict[TaskState, int]] = {}
        for queue, state, count in self._conn.execute(sql.COUNT_BY_QUEUE):
            counts.setdefault(queue, {})[TaskState(state)] = int(count)
        return counts
