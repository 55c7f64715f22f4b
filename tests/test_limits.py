"""Memory is bounded: the ready window pages the backlog in from disk in FIFO order, and
every full buffer says so (``ServerBusy``, HTTP 503 with ``Retry-After``)."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from taskserver import TASKSERVER, ServerBusy, TaskContext, TaskServer
from taskserver.push.fanout import Fanout

from .conftest import ClientFactory, ServerFactory, wait_for


def count_tasks(db: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM tasks").fetchone()[0])


async def test_ready_window_pages_the_backlog_in_fifo_order(make_server: ServerFactory) -> None:
    gate = asyncio.Event()
    order: list[int] = []
    ready_seen: list[int] = []
    holder: dict[str, TaskServer] = {}

    async def task(ctx: TaskContext) -> Any:
        if ctx.data == "blocker":
            await gate.wait()
        order.append(ctx.id)
        ready_seen.append(holder["server"].stats()["ready"])
        return None

    server = await make_server(task=task, task_workers=1, ready_window=10)
    holder["server"] = server
    blocker = await server.task("blocker")
    await wait_for(lambda: server.stats()["running"] == 1, message="the blocker runs")
    ids = [await server.task(n) for n in range(100)]

    held = server.stats()
    assert held["queued"] == 100
    assert held["ready"] == 10  # only the window is in memory...
    assert held["backlog_on_disk"] is True  # ...the other 90 wait on disk

    gate.set()
    await wait_for(lambda: server.stats()["succeeded"] == 101, timeout=20, message="all tasks done")
    assert order == [blocker, *ids]  # FIFO, through every page
    assert max(ready_seen) <= 10
    # The last page may still be on its way back (it finds nothing): wait for it.
    await wait_for(
        lambda: (
            (server.stats()["queued"], server.stats()["ready"], server.stats()["backlog_on_disk"])
            == (0, 0, False)
        ),
        message="the backlog is known to be empty",
    )


async def test_backlog_left_on_disk_runs_in_order_after_a_restart(
    make_server: ServerFactory,
) -> None:
    first = await make_server(task_workers=0, ready_window=10)
    ids = [await first.task(n) for n in range(60)]
    await first.stop()

    order: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        order.append(ctx.id)
        return None

    second = await make_server(task=task, task_workers=1, ready_window=10)
    assert second.stats()["ready"] <= 10
    await wait_for(lambda: second.stats()["succeeded"] == 60, timeout=20, message="all done")
    assert order == ids


async def test_cancel_a_task_waiting_on_disk(make_server: ServerFactory) -> None:
    gate = asyncio.Event()
    order: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        if ctx.data == "blocker":
            await gate.wait()
        order.append(ctx.id)
        return None

    server = await make_server(task=task, task_workers=1, ready_window=2)
    blocker = await server.task("blocker")
    await wait_for(lambda: server.stats()["running"] == 1, message="the blocker runs")
    ids = [await server.task(n) for n in range(6)]
    assert server.stats()["backlog_on_disk"] is True
    in_memory, on_disk = ids[0], ids[4]  # the window holds the first two
    assert (await server.cancel(on_disk)).state == "cancelled"
    assert (await server.cancel(in_memory)).state == "cancelled"
    counts = server.stats()
    assert (counts["queued"], counts["cancelled"]) == (4, 2)
    gate.set()
    await wait_for(lambda: server.stats()["succeeded"] == 5, message="the rest done")
    assert order == [blocker, *[i for i in ids if i not in (in_memory, on_disk)]]
    assert (await server.get(on_disk)).state == "cancelled"


async def test_max_queued_gives_503_with_retry_after(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0, max_queued=3)
    for n in range(3):
        assert (await client.post("/tasks", json={"data": n})).status == 202
    response = await client.post("/tasks", json={"data": "one too many"})
    assert response.status == 503
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert int(response.headers["Retry-After"]) >= 1
    body = await response.json(content_type=None)
    assert body["status"] == 503
    assert "3" in body["detail"]
    listed = await (await client.get("/tasks")).json()
    assert len(listed["tasks"]) == 3
    assert client.app is not None
    assert count_tasks(client.app[TASKSERVER].settings.db) == 3
    # Room again once one leaves the queue.
    first = listed["tasks"][0]["id"]
    assert (await client.delete(f"/tasks/{first}")).status == 200
    assert (await client.post("/tasks", json={"data": "fits now"})).status == 202


async def test_max_queued_raises_server_busy(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0, max_queued=2)
    await server.task(1)
    await server.task(2)
    with pytest.raises(ServerBusy) as caught:
        await server.task(3)
    assert caught.value.retry_after > 0
    assert count_tasks(server.settings.db) == 2


async def test_full_write_buffer_refuses_instead_of_growing(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0, max_pending_writes=5)
    outcomes = await asyncio.gather(*(server.task(n) for n in range(10)), return_exceptions=True)
    accepted = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert accepted
    assert refused
    assert all(isinstance(o, ServerBusy) for o in refused)
    # Refused calls wrote nothing; accepted ones are all there.
    assert count_tasks(server.settings.db) == len(accepted)
    assert server.stats()["queued"] == len(accepted)


async def test_too_many_streams_get_503(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0, max_subscribers=1)
    async with client.get("/events") as first:
        assert first.status == 200
        second = await client.get("/events")
        assert second.status == 503
        assert "Retry-After" in second.headers
        assert second.headers["Content-Type"].startswith("application/problem+json")
        second.release()


async def test_event_hub_drops_only_the_slow_subscriber() -> None:
    hub: Fanout[int] = Fanout(max_subscribers=2, buffer_size=3)
    slow = hub.subscribe(match_all=True)
    fast = hub.subscribe(("topic",))
    received: list[int] = []
    for item in range(6):
        hub.publish(("topic",), item)
        got = await fast.get()
        assert got is not None
        received.append(got)
    assert received == list(range(6))
    assert slow.overflowed
    assert slow.closed
    assert await slow.get() is None  # its buffer is discarded: the client must replay
    assert not fast.overflowed
    assert hub.dropped == 1
    assert len(hub) == 1
    hub.subscribe(("other",))
    with pytest.raises(ServerBusy):
        hub.subscribe(match_all=True)
    fast.close()
    assert len(hub) == 1
