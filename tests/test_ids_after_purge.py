"""Ids are never reused, even after the newest rows were purged and the server restarted."""

from __future__ import annotations

from taskserver import Settings, TaskServer

from .conftest import noop_finish, noop_task


async def start(settings: Settings) -> TaskServer:
    server = TaskServer(settings)
    server.on("task", noop_task)
    server.on("finish", noop_finish)
    await server.start()
    return server


async def test_purged_ids_are_not_handed_out_again(settings: Settings) -> None:
    first = await start(settings)
    ids = [await first.task(n) for n in range(3)]
    await first.wait(ids, 10)
    last_event = first.stats()["last_event_id"]
    assert await first.purge(0) == 3
    await first.stop()

    second = await start(settings)
    try:
        new = await second.task("after")
        assert new > max(ids)
        events = await second.events_after(0)
        assert events
        assert min(e.id for e in events) > last_event  # a client at last_event misses nothing
    finally:
        await second.stop()
