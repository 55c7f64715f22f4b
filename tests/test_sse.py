"""Server-Sent Events: per-task streams, the all-events stream, ``Last-Event-ID`` replay
(also across a restart), and a fast subscriber kept (slow ones: test_fanout.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import TASKSERVER, TaskContext, TaskServer

from .conftest import ClientFactory, SSEEvent, SSEReader, sse, wait_for

Client = TestClient[web.Request, web.Application]


def server_of(client: Client) -> TaskServer:
    assert client.app is not None
    return client.app[TASKSERVER]


def stored_events(db: str, after: int = 0) -> list[tuple[int, int | None, str | None, str]]:
    """``(id, task_id, type, data)`` of every stored event above ``after``, read directly."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, task_id, type, data FROM events WHERE id > ? ORDER BY id", (after,)
        ).fetchall()
    return [(int(r[0]), r[1], r[2], str(r[3])) for r in rows]


async def post(client: Client, data: Any) -> int:
    response = await client.post("/tasks", json={"data": data})
    assert response.status == 202
    task_id: int = (await response.json())["id"]
    return task_id


def ids_of(events: list[SSEEvent]) -> list[int]:
    return [int(e.id or 0) for e in events]


async def read_until_finished(reader: SSEReader, task_ids: set[int]) -> list[SSEEvent]:
    """Read events until every task in ``task_ids`` has a terminal event."""
    events: list[SSEEvent] = []
    pending = set(task_ids)
    while pending:
        event = await reader.next()
        assert event is not None, "stream ended early"
        events.append(event)
        if event.event in ("finished", "failed", "cancelled"):
            pending.discard(orjson.loads(event.data)["task_id"])
    return events


# --- GET /tasks/{id}/events --------------------------------------------------------------


async def test_task_stream_replays_then_goes_live_then_ends(
    make_client: ClientFactory,
) -> None:
    gate = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await ctx.progress(0.5, "half")
        await gate.wait()
        return "done"

    client = await make_client(task=task)
    db = server_of(client).settings.db
    task_id = await post(client, None)
    await wait_for(lambda: len(stored_events(db)) == 3, message="queued, started, progress stored")
    async with client.get(f"/tasks/{task_id}/events") as response:
        reader = sse(response)
        replayed = await reader.collect(3)
        assert [e.event for e in replayed] == ["queued", "started", "progress"]
        gate.set()
        live = await reader.next()
        assert live is not None
        assert live.event == "finished"
        assert orjson.loads(live.data)["result"] == "done"
        assert await reader.next() is None  # the stream ends after the terminal event
    events = [*replayed, live]
    assert ids_of(events) == sorted(set(ids_of(events)))
    # What was sent is exactly what is stored.
    assert [(int(e.id or 0), e.event, e.data) for e in events] == [
        (i, t, d) for i, _, t, d in stored_events(db)
    ]
    for event in events:
        payload = orjson.loads(event.data)
        assert payload["task_id"] == task_id
        assert payload["type"] == event.event


async def test_task_stream_of_an_ended_task_replays_and_ends(make_client: ClientFactory) -> None:
    client = await make_client()
    task_id = await post(client, {"x": 1})
    await server_of(client).wait_terminal(task_id, timeout=10)
    async with client.get(f"/tasks/{task_id}/events") as response:
        events = await sse(response).collect(timeout=5)
    assert [e.event for e in events] == ["queued", "started", "finished"]


async def test_task_stream_resumes_after_last_event_id(make_client: ClientFactory) -> None:
    client = await make_client()
    task_id = await post(client, "resume")
    await server_of(client).wait_terminal(task_id, timeout=10)
    async with client.get(f"/tasks/{task_id}/events") as response:
        everything = await sse(response).collect(timeout=5)
    first_id = everything[0].id
    assert first_id is not None
    async with client.get(
        f"/tasks/{task_id}/events", headers={"Last-Event-ID": first_id}
    ) as response:
        rest = await sse(response).collect(timeout=5)
    assert rest == everything[1:]


async def test_task_stream_shows_only_its_own_task(make_client: ClientFactory) -> None:
    gate = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await gate.wait()
        return ctx.data

    client = await make_client(task=task)
    mine = await post(client, "mine")
    async with client.get(f"/tasks/{mine}/events") as response:
        reader = sse(response)
        other = await post(client, "other")
        gate.set()
        events = await reader.collect(timeout=5)
    assert {orjson.loads(e.data)["task_id"] for e in events} == {mine}
    assert events[-1].event == "finished"
    assert other != mine


async def test_task_stream_ends_with_cancelled(make_client: ClientFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        await asyncio.Event().wait()

    client = await make_client(task=task)
    task_id = await post(client, None)
    async with client.get(f"/tasks/{task_id}/events") as response:
        reader = sse(response)
        started = await reader.collect(2)
        assert [e.event for e in started] == ["queued", "started"]
        assert (await client.delete(f"/tasks/{task_id}")).status == 200
        rest = await reader.collect(timeout=5)
    assert [e.event for e in rest] == ["cancelled"]
    assert orjson.loads(rest[0].data)["state"] == "cancelled"


async def test_task_stream_goes_on_through_retries(make_client: ClientFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return ctx.attempt

    client = await make_client(task=task, retry_base=0.0, retry_jitter=0.0)
    response = await client.post("/tasks", json={"data": None, "max_attempts": 2})
    task_id = (await response.json())["id"]
    async with client.get(f"/tasks/{task_id}/events") as stream:
        events = await sse(stream).collect(timeout=10)
    types = [e.event for e in events]
    assert "retrying" in types
    assert types.count("started") == 2
    assert types[-1] == "finished"
    assert orjson.loads(events[-1].data)["result"] == 2


# --- GET /events -----------------------------------------------------------------------


async def test_events_without_cursor_are_live_only(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    await post(client, "old")
    async with client.get("/events") as response:
        reader = sse(response)
        new = await post(client, "new")
        event = await reader.next()
    assert event is not None
    assert orjson.loads(event.data)["task_id"] == new
    assert event.event == "queued"


async def test_events_without_cursor_get_every_event_committed_after_connecting(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task_workers=0)
    server = server_of(client)
    await post(client, "before")
    # Another writer holds the database: the next commit waits, as behind a slow disk.
    lock = sqlite3.connect(server.settings.db, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        pending = asyncio.create_task(server.task("in flight"))
        await wait_for(lambda: server.store.last_event_id == 2, message="event id handed out")
        async with client.get("/events") as response:
            reader = sse(response)
            lock.execute("COMMIT")  # now the in-flight task commits: after we connected
            in_flight = await pending
            after = await post(client, "after")
            first = await reader.next()
            assert first is not None
            assert orjson.loads(first.data)["task_id"] == in_flight
            second = await reader.next()
            assert second is not None
            assert orjson.loads(second.data)["task_id"] == after
    finally:
        lock.close()


async def test_events_resume_after_last_event_id_header(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    ids = [await post(client, n) for n in range(3)]
    async with client.get("/events", headers={"Last-Event-ID": "1"}) as response:
        reader = sse(response)
        replayed = await reader.collect(2)
        fourth = await post(client, 3)
        live = await reader.next()
    assert [orjson.loads(e.data)["task_id"] for e in replayed] == ids[1:]
    assert ids_of(replayed) == [2, 3]
    assert live is not None
    assert orjson.loads(live.data)["task_id"] == fourth
    assert int(live.id or 0) == 4


async def test_events_resume_after_last_event_id_query(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    ids = [await post(client, n) for n in range(3)]
    async with client.get("/events?lastEventID=2") as response:
        event = await sse(response).next()
    assert event is not None
    assert event.id == "3"
    assert orjson.loads(event.data)["task_id"] == ids[2]
    async with client.get("/events?lastEventID=0") as response:
        everything = await sse(response).collect(3)
    assert ids_of(everything) == [1, 2, 3]


async def test_live_events_are_stored_before_they_are_pushed(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=2)
    db = server_of(client).settings.db
    async with client.get("/events") as response:
        reader = sse(response)
        ids = {await post(client, n) for n in range(10)}
        pending = set(ids)
        while pending:
            event = await reader.next()
            assert event is not None
            # At the moment a client sees an event, the file already holds it.
            stored = {i: d for i, _, _, d in stored_events(db, int(event.id or 0) - 1)}
            assert stored.get(int(event.id or 0)) == event.data
            if event.event == "finished":
                pending.discard(orjson.loads(event.data)["task_id"])


async def test_events_replay_across_a_restart(make_client: ClientFactory) -> None:
    first = await make_client(task_workers=0)
    db = server_of(first).settings.db
    a = await post(first, "a")
    async with first.get("/events?lastEventID=0") as response:
        seen = await sse(response).next()
    assert seen is not None
    assert seen.id is not None
    b = await post(first, "b")  # missed by the client
    c = await post(first, "c")
    await first.close()  # stops the server; tasks stay queued on disk

    second = await make_client(task_workers=2)
    async with second.get("/events", headers={"Last-Event-ID": seen.id}) as response:
        events = await read_until_finished(sse(response), {a, b, c})
    got = ids_of(events)
    assert got == sorted(set(got))
    assert got[0] > int(seen.id)
    assert [orjson.loads(e.data)["task_id"] for e in events[:2]] == [b, c]
    assert [(int(e.id or 0), e.data) for e in events] == [
        (i, d) for i, _, _, d in stored_events(db, int(seen.id)) if i <= got[-1]
    ]


# --- slow subscribers -------------------------------------------------------------------


# A slow subscriber (one that stops reading) is dropped and catches up by replay:
# tests/test_fanout.py::test_slow_subscriber_is_dropped_and_catches_up_by_replay.


async def test_fast_subscriber_is_not_dropped(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0, subscriber_queue=50)
    server = server_of(client)
    async with client.get("/events") as response:
        reader = sse(response)
        burst = await asyncio.gather(*(server.task(n) for n in range(10)))
        events = await reader.collect(10)
    assert [orjson.loads(e.data)["task_id"] for e in events] == sorted(burst)
    assert server.fanout.dropped == 0
