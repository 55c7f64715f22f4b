"""The data taskserver moves around: tasks, their states, and events.

The sets of states and every transition between them are in ``lifecycle``.

``Task`` is the in-memory picture of one row of the ``tasks`` table. ``Event`` is
one row of the ``events`` table: every state change of every task, with an id
that only ever increases, so a client can resume a stream after any id.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson


class TaskState(StrEnum):
    """Where a task is in its life. Stored as the lowercase value."""

    QUEUED = "queued"
    WAITING = "waiting"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventType(StrEnum):
    """What happened to a task. Also the SSE ``event:`` name."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    WAITING = "waiting"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The last event a task ever emits; a per-task stream ends after one.
TERMINAL_EVENTS: frozenset[EventType] = frozenset(
    {EventType.FINISHED, EventType.FAILED, EventType.CANCELLED}
)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to wait before attempt ``n + 1`` after attempt ``n`` failed.

    delay = min(cap, base * factor^(n-1)), then spread by +/-``jitter`` (a
    fraction) so that tasks failing together do not retry together. The
    default cap of 16 minutes follows ADT BackgroundQueue's doubling backoff.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 960.0
    jitter: float = 0.1

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """The delay after failed attempt ``attempt`` (1-based); ``rand`` in [0, 1)."""
        raw = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        return max(0.0, min(self.cap, raw * (1 + self.jitter * (2 * rand - 1))))

    def to_json(self) -> dict[str, float]:
        return {"base": self.base, "factor": self.factor, "cap": self.cap, "jitter": self.jitter}


@dataclass(slots=True)
class Task:
    """One task. Times are seconds since the epoch, from the server's clock."""

    id: int
    data: Any
    state: TaskState
    max_attempts: int
    timeout: float | None
    created_at: float
    updated_at: float
    queue: str = "default"
    priority: int = 0
    available_at: float = 0.0
    name: str | None = None
    serial_group: str | None = None
    unique_key: str | None = None
    retry: RetryPolicy | None = None
    attempts: int = 0
    progress: float | None = None
    message: str | None = None
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    finish_error: str | None = None
    hook_error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The public JSON shape of a task, as ``GET /tasks/{id}`` answers it."""
        return {
            "id": self.id,
            "state": self.state.value,
            "name": self.name,
            "queue": self.queue,
            "priority": self.priority,
            "serial_group": self.serial_group,
            "unique_key": self.unique_key,
            "data": self.data,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "timeout": self.timeout,
            "progress": self.progress,
            "message": self.message,
            "result": self.result,
            "error": self.error,
            "traceback": self.traceback,
            "finish_error": self.finish_error,
            "hook_error": self.hook_error,
            "retry": self.retry.to_json() if self.retry else None,
            "created_at": self.created_at,
            "available_at": self.available_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
        }


@dataclass(slots=True)  # not frozen: built for every state change, and frozen is slower
class Event:
    """One stored event: a task's state change, or an update published to the Mercure hub.

    ``id`` is the store's sequence number; it only ever increases. ``json`` is
    the payload exactly as stored and as sent in the SSE ``data:`` field. For a
    task event it is an object holding at least ``task_id``, ``type``, ``state``
    and ``at``; kept encoded so that fan-out never re-serialises it.

    Task events have ``task_id`` set and no ``topics`` (their topic is derived
    from the id and the server's URL when published). Published updates have
    ``task_id`` ``None``, their ``topics`` (canonical first), the publisher's
    ``uid`` if any, and the ``private`` and ``retry`` fields of the protocol.
    """

    id: int
    task_id: int | None
    type: str | None
    json: str
    topics: tuple[str, ...] = ()
    private: bool = False
    uid: str | None = None
    retry: int | None = None

    @property
    def sse_id(self) -> str:
        """The SSE ``id:`` of this event: the publisher's id, else the sequence number."""
        return self.uid if self.uid is not None else str(self.id)

    @property
    def data(self) -> Any:
        """The decoded payload (task events are JSON; published data may be any text)."""
        return orjson.loads(self.json)
