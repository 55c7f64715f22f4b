"""Reads of committed state from PostgreSQL (the ``Backend`` read methods), on the pool."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson

from ...errors import ServerBusy, ServerClosed
from ...models import Event, Task, TaskState
from ..rows import queue_counts, state_counts
from . import schema as sql

#: What a lost or refused connection raises.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,  # shut down, starting up, our session terminated
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidCatalogNameError,  # the database was dropped
    asyncpg.ObjectNotInPrerequisiteStateError,  # it does not accept connections now
    asyncpg.InternalClientError,  # the driver lost track of a session the server ended
)


class PostgresReads:
    """The read half of ``PostgresBackend``; it sets the pool."""

    _pool: asyncpg.Pool | None

    async def _fetch(self, query: str, *params: Any) -> list[Any]:
        if self._pool is None:
            raise ServerClosed("the PostgreSQL backend is not open")
        try:
            rows: list[Any] = await self._pool.fetch(query, *params)
        except UNREACHABLE as exc:  # the database went away: say so (503), do not crash
            raise ServerBusy(f"the database cannot be read now: {exc}", retry_after=1.0) from None
        return rows

    async def _value(self, query: str, *params: Any) -> Any:
        rows = await self._fetch(query, *params)
        return rows[0][0] if rows else None

    async def get_task(self, task_id: int) -> Task | None:
        """``Backend.get_task``."""
        rows = await self._fetch(sql.SELECT_TASK, task_id)
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
        """``Backend.list_tasks``."""
        given = {"queue": queue, "name": name, "unique_key": unique_key}
        if any(v is not None for v in given.values()):
            given = {"state": None if state is None else state.value, **given}
            keys = tuple(k for k, v in given.items() if v is not None)
            query = sql.select_tasks(keys, desc=before is not None)
            cursor = before if before is not None else after
            rows = await self._fetch(query, cursor, limit, *(given[k] for k in keys))
            return [sql.task_from_row(r) for r in rows]
        if before is not None:
            query = sql.SELECT_TASKS_DESC if state is None else sql.SELECT_TASKS_BY_STATE_DESC
            params: tuple[Any, ...] = (before, limit)
        else:
            query = sql.SELECT_TASKS if state is None else sql.SELECT_TASKS_BY_STATE
            params = (after, limit)
        if state is not None:
            params = (*params, state.value)
        return [sql.task_from_row(r) for r in await self._fetch(query, *params)]

    async def ids_in_state(self, state: TaskState, limit: int) -> list[int]:
        """``Backend.ids_in_state``."""
        return [r[0] for r in await self._fetch(sql.SELECT_IDS_BY_STATE, state.value, limit)]

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        """``Backend.events_after``."""
        if task_id is not None:
            rows = await self._fetch(sql.SELECT_TASK_EVENTS_AFTER, after_id, limit, task_id)
        elif tasks_only:
            rows = await self._fetch(sql.SELECT_ALL_TASK_EVENTS_AFTER, after_id, limit)
        else:
            rows = await self._fetch(sql.SELECT_EVENTS_AFTER, after_id, limit)
        return [sql.event_from_row(r) for r in rows]

    async def find_event(self, uid: str) -> int | None:
        """``Backend.find_event``."""
        value = await self._value(sql.SELECT_EVENT_BY_UID, uid)
        return None if value is None else int(value)

    async def count_by_state(self) -> dict[TaskState, int]:
        """``Backend.count_by_state``."""
        return state_counts(await self._fetch(sql.COUNT_BY_STATE))

    async def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """``Backend.count_by_queue``."""
        return queue_counts(await self._fetch(sql.COUNT_BY_QUEUE))

    async def paused_queues(self) -> list[str]:
        """Names of the paused queues, sorted."""
        return [r[0] for r in await self._fetch(sql.SELECT_PAUSED)]

    async def queues_with_work(self) -> list[str]:
        """Queues with queued tasks."""
        return [r[0] for r in await self._fetch(sql.SELECT_QUEUES_WITH_WORK)]

    async def next_due(self) -> float | None:
        """``Backend.next_due``."""
        value = await self._value(sql.SELECT_NEXT_DUE)
        return None if value is None else float(value)

    async def recent_unique(self, key: str, since: float) -> int | None:
        """``Backend.recent_unique``."""
        value = await self._value(sql.SELECT_RECENT_UNIQUE, key, since)
        return None if value is None else int(value)

    async def schedules(self) -> dict[str, float]:
        """``Backend.schedules``."""
        return {name: float(due) for name, due in await self._fetch(sql.SELECT_SCHEDULES)}

    async def nodes(self) -> list[dict[str, Any]]:
        """The nodes of the cluster with a lease: id, host, pid, start, seconds since their
        last heartbeat, and what each reported (``info``: workers, busy)."""
        return [
            {
                "id": node_id,
                "host": host,
                "pid": pid,
                "started_at": started,
                "heartbeat_age": max(0.0, float(now) - float(beat)),
                **orjson.loads(info),
            }
            for node_id, host, pid, started, beat, info, now in await self._fetch(sql.SELECT_NODES)
        ]
