"""The per-task stream of an ended task: replayed once, then ``204`` to a reconnect.

The SSE spec has ``EventSource`` reconnect whenever a stream ends, with the
``Last-Event-ID`` of the last event it saw; only a ``204`` makes it stop. A task
stream ends after the task's last event, so a browser would reconnect every
second to a stream that has nothing more to say.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import TaskContext

from .conftest import ClientFactory, sse

Client = TestClient[web.Request, web.Application]


async def finished_task(client: Client) -> int:
    response = await client.post("/tasks", json={"data": "x"})
    assert response.status == 202
    task_id: int = (await response.json())["id"]
    task = await (await client.get(f"/tasks/{task_id}?wait=10")).json()
    assert task["state"] == "succeeded"
    return task_id


async def test_an_ended_task_is_replayed_once_then_answered_204(make_client: ClientFactory) -> None:
    client = await make_client()
    task_id = await finished_task(client)

    # The first connection, without a cursor: every event, then the end.
    async with client.get(f"/tasks/{task_id}/events") as response:
        events = await sse(response).collect(timeout=5)
    assert [e.event for e in events] == ["queued", "started", "finished"]
    last = int(events[-1].id or 0)

    # EventSource reconnects with the last id it saw (or one past it): 204, at once.
    for cursor in (last, last + 1000):
        header = {"Last-Event-ID": str(cursor)}
        for path in (f"/tasks/{task_id}/events", f"/tasks/{task_id}/events?lastEventID={cursor}"):
            async with asyncio.timeout(5):
                async with client.get(
                    path, headers=header if "?" not in path else None
                ) as response:
                    assert response.status == 204, path
                    assert await response.read() == b""

    # A cursor before the end still gets what came after it, then the end.
    first = int(events[0].id or 0)
    async with client.get(
        f"/tasks/{task_id}/events", headers={"Last-Event-ID": str(first)}
    ) as response:
        rest = await sse(response).collect(timeout=5)
    assert [e.event for e in rest] == ["started", "finished"]


async def test_a_cursor_on_a_running_task_keeps_the_stream_open(
    make_client: ClientFactory,
) -> None:
    gate = asyncio.Event()

    async def held(ctx: TaskContext) -> Any:
        await gate.wait()
        return None

    client = await make_client(task=held)
    response = await client.post("/tasks", json={"data": None})
    task_id = (await response.json())["id"]
    async with client.get(f"/tasks/{task_id}/events") as stream:
        reader = sse(stream)
        started = [await reader.next(), await reader.next()]
        assert [e.event for e in started if e] == ["queued", "started"]
    cursor = started[-1].id if started[-1] else ""
    async with client.get(
        f"/tasks/{task_id}/events", headers={"Last-Event-ID": str(cursor)}
    ) as stream:
        reader = sse(stream)  # 200, an event stream: the task has not ended
        gate.set()
        finished = await reader.collect(timeout=5)
    assert [e.event for e in finished] == ["finished"]
