"""Reads of committed state from SQLite (the ``Backend`` read methods).

Plain queries use a read-only connection of their own (aiosqlite), so they never
wait behind a commit (WAL); a ``:memory:`` database has one connection only, so
its reads run on the writer's thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import aiosqlite

from ...models import Event, Task, TaskState
from ..rows import queue_counts, state_counts
from . import schema as sql
from .writer import WriterThread


class SqliteReads:
    """The read half of ``SqliteBackend``; it sets the connections."""

    _conn: sqlite3.Connection | None
    _reader: aiosqlite.Connection | None
    _thread: WriterThread | None

    async def _in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._thread is not None
        return await self._thread.run(fn, *args)

    async def _fetch(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if self._reader is None:  # :memory: — the writer's connection is the only one

            def read() -> list[Any]:
                assert self._conn is not None
                return self._conn.execute(query, params).fetchall()

            return list(await self._in_writer(read))
        return list(await self._reader.execute_fetchall(query, params))

    async def get_task(self, task_id: int) -> Task | None:
        """The committed state of one task, or ``None``."""
        rows = await self._fetch(sql.SELECT_TASK, (task_id,))
        return sql.task_from_row(rows[0]) if rows else None

    async def list_tasks(
        self,
        *,
        state: TaskState | None,
        after: int,
        limit: int,
        before: int | None = None,
        queue: str | None = None,
        name: str | None = None,
        unique_key: str | None = None,
    ) -> list[Task]:
        """Up to ``limit`` committed tasks: ids above ``after`` in id order, or, with
        ``before``, ids below it newest first; filtered as ``Backend.list_tasks`` says."""
        given = {"queue": queue, "name": name, "unique_key": unique_key}
        if any(v is not None for v in given.values()):
            given = {"state": None if state is None else state.value, **given}
            keys = tuple(k for k, v in given.items() if v is not None)
            params = (*(given[k] for k in keys), before if before is not None else after, limit)
            query = sql.select_tasks(keys, desc=before is not None)
            return [sql.task_from_row(r) for r in await self._fetch(query, params)]
        if before is not None:
            if state is None:
                rows = await self._fetch(sql.SELECT_TASKS_DESC, (before, limit))
            else:
                rows = await self._fetch(sql.SELECT_TASKS_BY_STATE_DESC, (state, before, limit))
        elif state is None:
            rows = await self._fetch(sql.SELECT_TASKS, (after, limit))
        else:
            rows = await self._fetch(sql.SELECT_TASKS_BY_STATE, (state, after, limit))
        return [sql.task_from_row(r) for r in rows]

    async def ids_in_state(self, state: TaskState, limit: int) -> list[int]:
        """Up to ``limit`` ids of committed tasks in ``state``, oldest first."""
        return [int(r[0]) for r in await self._fetch(sql.SELECT_IDS_BY_STATE, (state.value, limit))]

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        """Up to ``limit`` committed events with ids above ``after_id``, in id order.

        ``task_id`` keeps one task's events; ``tasks_only`` drops published updates.
        """
        if task_id is not None:
            rows = await self._fetch(sql.SELECT_TASK_EVENTS_AFTER, (task_id, after_id, limit))
        else:
            query = sql.SELECT_ALL_TASK_EVENTS_AFTER if tasks_only else sql.SELECT_EVENTS_AFTER
            rows = await self._fetch(query, (after_id, limit))
        return [sql.event_from_row(r) for r in rows]

    async def find_event(self, uid: str) -> int | None:
        """The sequence number of the first stored event with publisher id ``uid``, or
        ``None`` (a publisher may reuse an id: replay after its first use misses nothing)."""
        rows = await self._fetch(sql.SELECT_EVENT_BY_UID, (uid,))
        return int(rows[0][0]) if rows else None

    async def count_by_state(self) -> dict[TaskState, int]:
        """How many tasks are in each state, from the committed rows."""
        return state_counts(await self._fetch(sql.COUNT_BY_STATE))

    async def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """Active tasks per queue and state."""
        return queue_counts(await self._fetch(sql.COUNT_BY_QUEUE))

    async def queues_with_work(self) -> list[str]:
        """Names of queues that have queued tasks on disk."""
        return [str(r[0]) for r in await self._fetch(sql.SELECT_QUEUES_WITH_WORK)]

    async def queued_seconds(self) -> list[tuple[str, int, int]]:
        """Queued tasks per queue and whole second of ``available_at`` (``Opened``)."""
        rows = await self._fetch(sql.SELECT_QUEUED_SECONDS)
        return [(str(q), int(s), int(n)) for q, s, n in rows]

    async def next_due(self) -> float | None:
        """The earliest ``available_at`` of a waiting or retrying task, or ``None``."""
        rows = await self._fetch(sql.SELECT_NEXT_DUE)
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def active_unique_keys(self) -> dict[str, int]:
        """``unique_key -> id`` of every task that has not ended."""
        return {str(k): int(i) for k, i in await self._fetch(sql.SELECT_ACTIVE_UNIQUE)}

    async def recent_unique(self, key: str, since: float) -> int | None:
        """The newest task with ``key`` that succeeded at or after ``since``."""
        rows = await self._fetch(sql.SELECT_RECENT_UNIQUE, (key, since))
        return int(rows[0][0]) if rows else None

    async def paused_queues(self) -> list[str]:
        """Names of the paused queues, sorted."""
        return [str(r[0]) for r in await self._fetch(sql.SELECT_PAUSED)]

    async def serial_heads(self) -> list[tuple[str, int, TaskState]]:
        """Per serial group with tasks that have not ended: its oldest one and that one's state."""
        rows = await self._fetch(sql.SELECT_GROUP_HEADS)
        return [(str(g), int(i), TaskState(state)) for g, i, state in rows]

    async def schedules(self) -> dict[str, float]:
        """``name -> last due time enqueued`` of every periodic schedule."""
        return {str(n): float(d) for n, d in await self._fetch(sql.SELECT_SCHEDULES)}
