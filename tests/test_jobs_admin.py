"""Dead letters and manual retry; purging ended tasks by hand and by retention settings."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import Conflict, Settings, TaskContext, TaskNotFound, TaskState

from .conftest import sse, wait_for
from .jobs_harness import (
    Clock,
    Gate,
    Jobs,
    all_tasks,
    event_types,
    get_json,
    post,
    refused,
    state_of,
)


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class FailOnce:
    """Fails the first run of every task whose data is ``"flaky"``; ``"hold"`` waits."""

    def __init__(self) -> None:
        self.runs: Counter[int] = Counter()
        self.gate = Gate()

    async def run(self, ctx: TaskContext) -> Any:
        self.runs[ctx.id] += 1
        if ctx.data == "hold":
            assert await self.gate.wait()
        if ctx.data == "always" or (ctx.data == "flaky" and self.runs[ctx.id] == 1):
            deliver_invoice(ctx.id)
        return {"runs": self.runs[ctx.id]}


def deliver_invoice(task_id: int) -> None:
    raise ConnectionError(f"SMTP refused invoice for task {task_id}")


# --- dead letters and manual retry ------------------------------------------------------


async def test_failed_tasks_keep_error_and_traceback(jobs: Jobs) -> None:
    client, server = await jobs.client(FailOnce().run)
    created = await post(client, "/tasks", {"data": "always"})
    task = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert task["state"] == "failed"
    assert task["error"] == f"ConnectionError: SMTP refused invoice for task {created['id']}"
    assert "Traceback (most recent call last)" in task["traceback"]
    assert "in deliver_invoice" in task["traceback"]
    assert "raise ConnectionError" in task["traceback"]
    failed = await get_json(client, "/tasks?state=failed")
    assert [t["id"] for t in failed["tasks"]] == [created["id"]]
    stored = await server.get(created["id"])
    assert stored.traceback == task["traceback"]


async def test_http_retry_requeues_a_failed_task_and_streams_the_rerun(jobs: Jobs) -> None:
    work = FailOnce()
    client, server = await jobs.client(work.run)
    created = await post(client, "/tasks", {"data": "flaky"})
    failed = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert failed["state"] == "failed"
    last_event = server.stats()["last_event_id"]

    response = await client.post(f"/tasks/{created['id']}/retry")
    assert response.status == 200, await response.text()
    retried = await response.json()
    assert retried["id"] == created["id"]
    assert (retried["state"], retried["attempts"], retried["error"]) == ("queued", 0, None)

    stream = sse(
        await client.get(
            f"/tasks/{created['id']}/events", headers={"Last-Event-ID": str(last_event)}
        )
    )
    events = await stream.collect()
    assert [e.event for e in events] == ["queued", "started", "finished"]
    assert orjson.loads(events[0].data)["manual_retry"] is True
    done = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert done["state"] == "succeeded"
    assert done["attempts"] == 1
    assert done["error"] is None
    assert done["traceback"] is None
    assert done["result"] == {"runs": 2}


async def test_retry_requeues_a_cancelled_task(jobs: Jobs) -> None:
    work = FailOnce()
    server = await jobs.server(work.run)
    waiting = await server.task("later", delay=3600)
    cancelled = await server.cancel(waiting)
    assert cancelled.state is TaskState.CANCELLED
    again = await server.retry(waiting)
    assert again.state is TaskState.QUEUED
    assert (await state_of(server, waiting, "succeeded")).result == {"runs": 1}
    assert (await event_types(server, waiting))[:3] == ["queued", "cancelled", "queued"]


async def test_retry_refuses_tasks_that_did_not_fail(jobs: Jobs) -> None:
    work = FailOnce()
    client, server = await jobs.client(work.run, task_workers=1)
    ok = await post(client, "/tasks", {"data": 1})
    await get_json(client, f"/tasks/{ok['id']}?wait=5")
    held = await post(client, "/tasks", {"data": "hold"})
    queued = await post(client, "/tasks", {"data": 2})
    await wait_for(lambda: work.runs[held["id"]] == 1)
    for task_id, state in [
        (ok["id"], "succeeded"),
        (held["id"], "running"),
        (queued["id"], "queued"),
    ]:
        body = await refused(await client.post(f"/tasks/{task_id}/retry"), 409, None)
        assert state in body["detail"]
    await refused(await client.post("/tasks/9999/retry"), 404, "id")
    await refused(await client.post("/tasks/abc/retry"), 404, None)
    with pytest.raises(Conflict):
        await server.retry(ok["id"])
    with pytest.raises(TaskNotFound):
        await server.retry(9999)
    work.gate.open()
    assert work.runs[ok["id"]] == 1


async def test_http_bulk_retry_by_ids_and_all_failed(jobs: Jobs) -> None:
    work = FailOnce()
    client, server = await jobs.client(work.run)
    batch = await post(
        client, "/tasks:batch", {"tasks": [{"data": "flaky"}, {"data": "flaky"}, {"data": 1}]}
    )
    first, second, ok = (t["id"] for t in batch["tasks"])
    for task_id in (first, second, ok):
        await get_json(client, f"/tasks/{task_id}?wait=5")
    answer = await post(client, "/tasks:retry", {"ids": [first, ok, 9999]}, status=200)
    assert answer["retried"] == [first]
    assert set(answer["errors"]) == {str(ok), "9999"}
    assert (await get_json(client, f"/tasks/{first}?wait=5"))["state"] == "succeeded"
    assert (await get_json(client, f"/tasks/{second}"))["state"] == "failed"

    more = await post(client, "/tasks", {"data": "flaky"})
    await get_json(client, f"/tasks/{more['id']}?wait=5")
    answer = await post(client, "/tasks:retry", {"failed": True}, status=200)
    assert sorted(answer["retried"]) == [second, more["id"]]
    for task_id in (second, more["id"]):
        assert (await get_json(client, f"/tasks/{task_id}?wait=5"))["state"] == "succeeded"
    assert server.stats()["failed"] == 0
    assert server.stats()["succeeded"] == 4
    assert await server.retry_failed() == []


@pytest.mark.parametrize(
    "body",
    [
        {"ids": "1"},
        {"ids": [0]},
        {"ids": [1.5]},
        {},
        {"failed": False},
        {"ids": [True]},
    ],
)
async def test_http_bad_bulk_retry_is_refused(jobs: Jobs, body: dict[str, Any]) -> None:
    client, _ = await jobs.client(task_workers=0)
    await refused(await client.post("/tasks:retry", json=body), 422, "ids")


async def test_retry_of_a_unique_task_refused_while_its_key_is_taken(jobs: Jobs) -> None:
    work = FailOnce()
    server = await jobs.server(work.run, task_workers=1)
    failed = await server.task("always", unique_key="invoice:1")
    await state_of(server, failed, "failed")
    held = await server.task("hold", unique_key="invoice:1")
    with pytest.raises(Conflict):
        await server.retry(failed)
    work.gate.open()
    await state_of(server, held, "succeeded")
    assert (await server.retry(failed)).id == failed


# --- purge ---------------------------------------------------------------------------------


async def ended_and_active(client: Any) -> dict[str, int]:
    """One succeeded, one failed, one cancelled and one waiting task, by state."""
    ids: dict[str, int] = {}
    ids["succeeded"] = (await post(client, "/tasks", {"data": 1}))["id"]
    ids["failed"] = (await post(client, "/tasks", {"data": "always"}))["id"]
    ids["waiting"] = (await post(client, "/tasks", {"data": 2, "delay": 3600}))["id"]
    ids["cancelled"] = (await post(client, "/tasks", {"data": 3, "delay": 3600}))["id"]
    response = await client.delete(f"/tasks/{ids['cancelled']}")
    assert response.status == 200
    for state in ("succeeded", "failed"):
        assert (await get_json(client, f"/tasks/{ids[state]}?wait=5"))["state"] == state
    return ids


async def test_http_purge_deletes_ended_tasks_and_their_events(jobs: Jobs) -> None:
    client, server = await jobs.client(FailOnce().run)
    ids = await ended_and_active(client)
    answer = await post(client, "/tasks:purge", {"older_than": 0}, status=200)
    assert answer == {"purged": 3}
    assert [t["id"] for t in await all_tasks(client)] == [ids["waiting"]]
    for state in ("succeeded", "failed", "cancelled"):
        await refused(await client.get(f"/tasks/{ids[state]}"), 404, "id")
        assert await server.events_after(0, task_id=ids[state]) == []
    assert await event_types(server, ids["waiting"]) == ["queued"]
    stats = await get_json(client, "/stats")
    assert (stats["succeeded"], stats["failed"], stats["cancelled"]) == (0, 0, 0)
    assert stats["tasks"]["waiting"] == 1
    replay = sse(await client.get("/events", headers={"Last-Event-ID": "0"}))
    first = await replay.next()
    assert first is not None
    assert orjson.loads(first.data)["task_id"] == ids["waiting"]


async def test_http_purge_by_state(jobs: Jobs) -> None:
    client, _ = await jobs.client(FailOnce().run)
    ids = await ended_and_active(client)
    answer = await post(
        client, "/tasks:purge", {"older_than": 0, "states": ["failed", "cancelled"]}, status=200
    )
    assert answer == {"purged": 2}
    assert [t["id"] for t in await all_tasks(client)] == [ids["succeeded"], ids["waiting"]]


async def test_purge_older_than_counts_from_the_end_of_the_task(jobs: Jobs) -> None:
    clock = Clock()
    client, server = await jobs.client(FailOnce().run, clock=clock)
    old = (await post(client, "/tasks", {"data": 1}))["id"]
    await get_json(client, f"/tasks/{old}?wait=5")
    clock.advance(100)
    young = (await post(client, "/tasks", {"data": 2}))["id"]
    await get_json(client, f"/tasks/{young}?wait=5")
    assert (await post(client, "/tasks:purge", {"older_than": 150}, status=200))["purged"] == 0
    assert (await post(client, "/tasks:purge", {"older_than": 50}, status=200))["purged"] == 1
    assert [t["id"] for t in await all_tasks(client)] == [young]
    assert await server.purge(0) == 1
    assert await server.list_tasks() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"older_than": -1}, "older_than"),
        ({"older_than": "old"}, "older_than"),
        ({}, "older_than"),
        ({"older_than": True}, "older_than"),
        ({"older_than": 0, "states": ["running"]}, "states"),
        ({"older_than": 0, "states": ["queued"]}, "states"),
        ({"older_than": 0, "states": []}, "states"),
        ({"older_than": 0, "states": "failed"}, "states"),
        ({"older_than": 0, "everything": True}, "everything"),
    ],
)
async def test_http_bad_purge_is_refused_and_deletes_nothing(
    jobs: Jobs, body: dict[str, Any], field: str
) -> None:
    client, _ = await jobs.client(FailOnce().run)
    ids = await ended_and_active(client)
    await refused(await client.post("/tasks:purge", json=body), 422, field)
    assert sorted(t["id"] for t in await all_tasks(client)) == sorted(ids.values())


async def test_purge_keeps_the_counters_right_while_tasks_run(jobs: Jobs) -> None:
    async def quick(ctx: TaskContext) -> Any:
        await asyncio.sleep(0.001)
        return ctx.data

    server = await jobs.server(quick, task_workers=4)
    ids: list[int] = []
    for _ in range(20):
        ids += [s.id for s in await server.task_many(range(30))]
        await server.purge(0)  # while tasks start and end
    await server.wait(ids[-30:], 10)

    async def settled() -> dict[str, int] | None:
        on_disk = {s.value: n for s, n in (await server.store.count_by_state()).items()}
        return on_disk if on_disk["queued"] == on_disk["running"] == 0 else None

    on_disk = await wait_for(settled, message="every task to end")
    # The in-memory counters (GET /stats) agree with the rows.
    assert server.stats()["tasks"] == on_disk


# --- retention settings ---------------------------------------------------------------------


async def test_retention_purges_ended_tasks_automatically(jobs: Jobs) -> None:
    clock = Clock()
    server = await jobs.server(
        FailOnce().run, clock=clock, retention=100, maintenance_interval=0.02
    )
    old = await server.task(1)
    old_failed = await server.task("always")
    await state_of(server, old, "succeeded")
    await state_of(server, old_failed, "failed")
    clock.advance(60)
    young = await server.task(2)
    await state_of(server, young, "succeeded")
    waiting = await server.task(3, delay=10_000)
    clock.advance(50)

    async def purged() -> bool:
        return [t.id for t in await server.list_tasks()] == [young, waiting]

    await wait_for(purged, message="the old tasks to be purged")
    assert await server.events_after(0, task_id=old) == []
    assert await event_types(server, young) == ["queued", "started", "finished"]
    assert server.stats()["succeeded"] == 1
    assert server.stats()["failed"] == 0


async def test_event_retention_trims_old_events(jobs: Jobs) -> None:
    clock = Clock()
    server = await jobs.server(
        clock=clock, retention=0, event_retention=100, maintenance_interval=0.02
    )
    old = await server.task(1)
    await state_of(server, old, "succeeded")
    clock.advance(60)
    young = await server.task(2)
    await state_of(server, young, "succeeded")
    clock.advance(50)

    async def trimmed() -> bool:
        return await server.events_after(0, task_id=old) == []

    await wait_for(trimmed, message="the old events to be trimmed")
    # The task itself stays (retention=0 keeps tasks forever); the young events stay.
    assert (await server.get(old)).state is TaskState.SUCCEEDED
    assert await event_types(server, young) == ["queued", "started", "finished"]


async def test_max_events_keeps_the_newest(jobs: Jobs) -> None:
    server = await jobs.server(max_events=5, maintenance_interval=0.02, retention=0)
    ids = [s.id for s in await server.task_many(range(6))]
    await server.wait(ids, 5)
    last = server.stats()["last_event_id"]
    assert last == 18

    async def kept() -> list[int] | None:
        events = await server.events_after(0, tasks_only=False)
        return [e.id for e in events] if len(events) == 5 else None

    assert await wait_for(kept, message="the history to shrink to 5") == list(
        range(last - 4, last + 1)
    )
    assert len(await server.list_tasks()) == 6


async def test_a_manual_retry_gives_the_task_all_its_attempts_again(jobs: Jobs) -> None:
    work = FailOnce()
    server = await jobs.server(work.run)
    task_id = await server.task("always", max_attempts=2, retry={"base": 0, "jitter": 0})
    assert (await state_of(server, task_id, "failed")).attempts == 2
    await server.retry(task_id)
    again = await state_of(server, task_id, "failed")
    assert again.attempts == 2
    assert work.runs[task_id] == 4
    types = await event_types(server, task_id)
    assert types.count("started") == 4
    assert types.count("failed") == 2


async def test_trimming_by_age_and_count_reports_what_it_deleted(jobs: Jobs) -> None:
    clock = Clock()
    server = await jobs.server(task_workers=0, clock=clock)
    await server.task_many(range(10))
    clock.advance(100)
    deleted = await server.store.trim_events(before=clock() - 50, keep=1_000_000, chunk=4)
    assert deleted == 4
    assert len(await server.events_after(0)) == 6
