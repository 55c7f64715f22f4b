"""The event payload, as stored and pushed: the same bytes whatever the backend.

Its fields are part of the wire format (SSE ``data:``, the Mercure hub, replay).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..models import EventType, Task


def dumps(value: Any) -> str:
    """JSON text of ``value`` (raises ``TypeError`` when it cannot be encoded)."""
    return orjson.dumps(value).decode()


def event_json(
    task: Task,
    type_: EventType,
    extra: dict[str, Any] | None,
    now: float,
    *,
    result: str | None = None,
) -> str:
    """The stored and pushed payload of one event about ``task``.

    ``result``, JSON text already encoded for the task's row, is embedded as is.
    (A dict encoded by orjson is faster here than formatting the text by hand.)
    """
    payload: dict[str, Any] = {
        "task_id": task.id,
        "type": type_,
        "state": task.state,
        "attempt": task.attempts,
        "queue": task.queue,
        "at": now,
    }
    if extra:
        payload.update(extra)
    if result is not None:
        payload["result"] = orjson.Fragment(result)
    return orjson.dumps(payload).decode()  # dumps(), inlined: three events a task
