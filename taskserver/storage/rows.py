"""What every backend reads back the same way: tasks and events from rows selected in
the shared column order, counts from ``(…, state, count)`` rows, what each
conditional move leads to and its event, and state lists in SQL. Backends keep their own SQL."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from .. import lifecycle
from ..models import Event, EventType, RetryPolicy, Task, TaskState
from .payload import event_json

#: Per conditional move (``intents.Move.kind``): the state it leads to and its event.
MOVES: dict[str, tuple[TaskState, EventType, dict[str, Any] | None]] = {
    "cancel": (lifecycle.CANCELLED, EventType.CANCELLED, None),
    "retry": (lifecycle.QUEUED, EventType.QUEUED, {"manual_retry": True}),
}


def move_event(kind: str, task_id: int, event_id: int, queue: str, now: float) -> Event:
    """The event of a conditional move (``MOVES[kind]``) that moved task ``task_id``."""
    state, type_, extra = MOVES[kind]
    stub = Task(
        id=task_id,
        data=None,
        state=state,
        max_attempts=1,
        timeout=None,
        created_at=now,
        updated_at=now,
        queue=queue,
    )
    return Event(event_id, task_id, type_, event_json(stub, type_, extra, now))


def state_list(states: Iterable[TaskState]) -> str:
    """A SQL list of state literals, in the order given: ``('queued', 'waiting')``."""
    return "(" + ", ".join(f"'{state.value}'" for state in states) + ")"


def _retry(text: str | None) -> RetryPolicy | None:
    return RetryPolicy(**orjson.loads(text)) if text else None


def task_from_row(row: Any) -> Task:
    """A ``Task`` from a row whose first 24 columns are, in order: id, state, name, queue,
    priority, serial_group, unique_key, data, attempts, max_attempts, timeout, retry,
    progress, message, result, error, traceback, finish_error, hook_error, created_at,
    available_at, started_at, finished_at, updated_at (data, retry, result: JSON text)."""
    return Task(
        id=row[0],
        state=TaskState(row[1]),
        name=row[2],
        queue=row[3],
        priority=row[4],
        serial_group=row[5],
        unique_key=row[6],
        data=orjson.loads(row[7]),
        attempts=row[8],
        max_attempts=row[9],
        timeout=row[10],
        retry=_retry(row[11]),
        progress=row[12],
        message=row[13],
        result=None if row[14] is None else orjson.loads(row[14]),
        error=row[15],
        traceback=row[16],
        finish_error=row[17],
        hook_error=row[18],
        created_at=row[19],
        available_at=row[20],
        started_at=row[21],
        finished_at=row[22],
        updated_at=row[23],
    )


def event_from_row(row: Any) -> Event:
    """An ``Event`` from a row of: id, task_id, type, data, topics (JSON text), private,
    uid, retry."""
    topics = tuple(orjson.loads(row[4])) if row[4] else ()
    return Event(row[0], row[1], row[2], row[3], topics, bool(row[5]), row[6], row[7])


def state_counts(rows: Iterable[Any]) -> dict[TaskState, int]:
    """``(state, count)`` rows as counts of every state (zeros included)."""
    counts = dict.fromkeys(TaskState, 0)
    for state, count in rows:
        counts[TaskState(state)] = int(count)
    return counts


def queue_counts(rows: Iterable[Any]) -> dict[str, dict[TaskState, int]]:
    """``(queue, state, count)`` rows as counts per queue and state."""
    counts: dict[str, dict[TaskState, int]] = {}
    for queue, state, count in rows:
        counts.setdefault(queue, {})[TaskState(state)] = int(count)
    return counts
