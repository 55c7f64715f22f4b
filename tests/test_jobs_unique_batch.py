"""Unique tasks (``unique_key``, ``unique_for``) and bulk enqueueing (``task_many``,
``POST /tasks:batch``): one transaction, all or nothing, bad items named by index.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import NotSerializable, ServerBusy, Settings, TaskContext, ValidationError
from taskserver.runtime.options import TaskSpec

from .conftest import sse, wait_for
from .jobs_harness import Clock, Gate, Jobs, all_tasks, get_json, post, refused, state_of


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Gated:
    """A task callback that holds data ``"hold"`` tasks until the gate opens; fails ``"fail"``."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.started: list[int] = []

    async def run(self, ctx: TaskContext) -> Any:
        self.started.append(ctx.id)
        if ctx.data == "hold":
            assert await self.gate.wait()
        if ctx.data == "fail":
            raise ValueError("failed on purpose")
        return ctx.data


# --- unique keys -------------------------------------------------------------------------


async def test_unique_key_returns_the_queued_or_running_task(jobs: Jobs) -> None:
    gated = Gated()
    server = await jobs.server(gated.run, task_workers=1)
    running = await server.submit("hold", unique_key="report:1")
    assert not running.existing
    await wait_for(lambda: running.id in gated.started)
    again = await server.submit("hold", unique_key="report:1")
    assert again.existing
    assert again.id == running.id
    assert await server.task("other", unique_key="report:1") == running.id
    # Queued (the only worker is busy) counts too.
    queued = await server.submit("x", unique_key="report:2")
    assert (await server.submit("y", unique_key="report:2")).id == queued.id
    assert len(await server.list_tasks()) == 2

    gated.gate.open()
    await state_of(server, running.id, "succeeded")
    await state_of(server, queued.id, "succeeded")
    fresh = await server.submit("after", unique_key="report:1")
    assert not fresh.existing
    assert fresh.id not in (running.id, queued.id)
    assert (await state_of(server, fresh.id, "succeeded")).result == "after"


async def test_unique_key_is_free_again_after_a_failure_or_a_cancel(jobs: Jobs) -> None:
    gated = Gated()
    server = await jobs.server(gated.run, task_workers=1)
    failed = await server.task("fail", unique_key="k")
    await state_of(server, failed, "failed")
    after_failure = await server.submit("ok", unique_key="k", unique_for=3600)
    assert not after_failure.existing  # unique_for counts successes only
    await state_of(server, after_failure.id, "succeeded")
    held = await server.task("hold", unique_key="c")
    await wait_for(lambda: held in gated.started)
    waiting = await server.task("x", unique_key="w", delay=3600)
    assert (await server.submit("x", unique_key="w")).id == waiting
    await server.cancel(waiting)
    assert not (await server.submit("x", unique_key="w")).existing
    gated.gate.open()


async def test_unique_for_counts_a_recent_success(jobs: Jobs) -> None:
    clock = Clock()
    server = await jobs.server(clock=clock)
    first = await server.task("a", unique_key="daily", unique_for=60)
    await state_of(server, first, "succeeded")
    again = await server.submit("b", unique_key="daily", unique_for=60)
    assert again.existing
    assert again.id == first
    # Without unique_for a finished task does not count.
    plain = await server.submit("c", unique_key="daily")
    assert not plain.existing
    await state_of(server, plain.id, "succeeded")
    clock.advance(61)
    later = await server.submit("d", unique_key="daily", unique_for=60)
    assert not later.existing
    assert later.id not in (first, plain.id)


async def test_unique_for_counts_a_holder_that_succeeds_during_the_look_up(jobs: Jobs) -> None:
    # The look-up of a recent success reads the disk while the holder still runs; the
    # holder's success commits (and frees its key) before the look-up answers.
    go = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await go.wait()

    server = await jobs.server(task)
    holder = await server.task("holder", unique_key="k")
    await state_of(server, holder, "running")
    store = server.store
    look_up = store.recent_unique
    calls = 0

    async def slow_look_up(key: str, since: float) -> int | None:
        nonlocal calls
        calls += 1
        found = await look_up(key, since)
        if calls == 1:
            go.set()
            await server.wait_terminal(holder, timeout=10)  # its key is free by now
        return found

    store.recent_unique = slow_look_up  # type: ignore[method-assign]
    again = await server.submit("again", unique_key="k", unique_for=60)
    assert (again.id, again.existing) == (holder, True)
    assert calls == 2


async def test_concurrent_submits_with_unique_for_create_one_task(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    results = await asyncio.gather(
        *(server.submit(n, unique_key="once", unique_for=60) for n in range(5))
    )
    assert len({r.id for r in results}) == 1
    assert sum(not r.existing for r in results) == 1
    assert len(await server.list_tasks()) == 1


async def test_unique_keys_survive_a_restart(jobs: Jobs) -> None:
    first = await jobs.server(task_workers=0)
    task_id = await first.task("x", unique_key="sync:7")
    await first.stop()
    second = await jobs.server(task_workers=0)
    again = await second.submit("y", unique_key="sync:7")
    assert again.existing
    assert again.id == task_id


async def test_http_unique_key_answers_200_existing(jobs: Jobs) -> None:
    gated = Gated()
    client, _ = await jobs.client(gated.run, task_workers=1)
    response = await client.post("/tasks", json={"data": "hold", "unique_key": "export:9"})
    assert response.status == 202
    created = await response.json()
    assert created["existing"] is False
    await wait_for(lambda: created["id"] in gated.started)
    response = await client.post("/tasks", json={"data": "hold", "unique_key": "export:9"})
    assert response.status == 200, await response.text()
    existing = await response.json()
    assert existing["existing"] is True
    assert existing["id"] == created["id"]
    assert existing["state"] == "running"
    assert response.headers["Location"] == f"/tasks/{created['id']}"
    assert len(await all_tasks(client)) == 1
    gated.gate.open()
    done = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert done["state"] == "succeeded"
    assert done["unique_key"] == "export:9"
    response = await client.post("/tasks", json={"data": 1, "unique_key": "export:9"})
    assert response.status == 202
    assert (await response.json())["id"] != created["id"]


async def test_http_unique_for_answers_200_for_a_recent_success(jobs: Jobs) -> None:
    client, server = await jobs.client()
    body = {"data": 1, "unique_key": "nightly", "unique_for": 3600}
    created = await post(client, "/tasks", body)
    await get_json(client, f"/tasks/{created['id']}?wait=5")
    existing = await post(client, "/tasks", body, status=200)
    assert existing["existing"] is True
    assert existing["id"] == created["id"]
    assert existing["state"] == "succeeded"
    assert server.stats()["succeeded"] == 1


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"unique_for": 60}, "unique_for"),
        ({"unique_key": "k", "unique_for": -1}, "unique_for"),
        ({"unique_key": "k", "unique_for": "1h"}, "unique_for"),
        ({"unique_key": ""}, "unique_key"),
        ({"unique_key": "with space"}, "unique_key"),
        ({"unique_key": 12}, "unique_key"),
    ],
)
async def test_http_bad_unique_options_are_refused(
    jobs: Jobs, options: dict[str, Any], field: str
) -> None:
    client, _ = await jobs.client(task_workers=0)
    response = await client.post("/tasks", json={"data": 1, **options})
    await refused(response, 422, field)
    assert await all_tasks(client) == []


# --- bulk --------------------------------------------------------------------------------


async def test_task_many_commits_everything_in_one_transaction(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    commits = server.stats()["commits"]
    items: list[Any] = [
        {"n": 0},
        TaskSpec({"n": 1}, {"queue": "x", "priority": 3}),
        {"n": 2},
        *({"n": n} for n in range(3, 100)),
    ]
    submitted = await server.task_many(items, priority=1, name="bulk")
    assert server.stats()["commits"] == commits + 1
    ids = [s.id for s in submitted]
    assert ids == sorted(ids)
    assert len(set(ids)) == 100
    assert not any(s.existing for s in submitted)
    tasks = await server.list_tasks(limit=1000)
    assert [t.data for t in tasks] == [{"n": n} for n in range(100)]
    assert len({t.created_at for t in tasks}) == 1
    assert (tasks[1].queue, tasks[1].priority, tasks[1].name) == ("x", 3, "bulk")
    assert (tasks[0].queue, tasks[0].priority, tasks[0].name) == ("default", 1, "bulk")
    assert server.stats()["queued"] == 100


async def test_task_many_is_all_or_nothing(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    commits = server.stats()["commits"]
    good = TaskSpec(1)
    with pytest.raises(ValidationError) as caught:
        await server.task_many([good, good, 3, TaskSpec(4, {"timeout": -1}), 5])
    assert caught.value.field == "tasks[3].timeout"
    with pytest.raises(NotSerializable):
        await server.task_many([1, 2, {"when": object()}])
    with pytest.raises(NotSerializable) as not_json:
        await server.task_many([1, TaskSpec({"when": object()}, {"priority": 1})])
    assert not_json.value.field == "tasks[1].data"
    with pytest.raises(ValidationError) as unknown:
        await server.task_many([1, TaskSpec(2, {"colour": "red"})])
    assert unknown.value.field == "tasks[1].colour"
    with pytest.raises(ValidationError) as empty:
        await server.task_many([])
    assert empty.value.field == "tasks"
    assert await server.list_tasks() == []
    assert server.stats()["queued"] == 0
    assert server.stats()["commits"] == commits


async def test_task_many_names_an_unencodable_plain_item(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    with pytest.raises(NotSerializable) as caught:
        await server.task_many([1, 2, {"when": object()}])
    assert caught.value.field == "tasks[2].data"
    assert await server.list_tasks() == []


async def test_task_many_with_unique_keys(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    before = await server.task("old", unique_key="a")
    submitted = await server.task_many(
        [
            TaskSpec(1, {"unique_key": "a"}),
            TaskSpec(2, {"unique_key": "b"}),
            TaskSpec(3, {"unique_key": "b"}),
            TaskSpec(4),
        ]
    )
    assert [s.existing for s in submitted] == [True, False, True, False]
    assert submitted[0].id == before
    assert submitted[2].id == submitted[1].id
    assert len(await server.list_tasks()) == 3


async def test_http_batch_creates_all_and_streams_their_events(jobs: Jobs) -> None:
    client, server = await jobs.client(task_workers=0)
    stream = sse(await client.get("/events"))
    commits = server.stats()["commits"]
    body = {
        "tasks": [
            {"data": {"n": 0}},
            {"data": {"n": 1}, "queue": "bulk", "priority": 5, "max_attempts": 3},
            {"data": {"n": 2}, "delay": 3600},
        ]
    }
    answer = await post(client, "/tasks:batch", body)
    assert server.stats()["commits"] == commits + 1
    created = answer["tasks"]
    assert [t["existing"] for t in created] == [False] * 3
    ids = [t["id"] for t in created]
    assert ids == sorted(ids)
    assert created[1]["url"] == f"/tasks/{ids[1]}"
    tasks = await all_tasks(client)
    assert [t["id"] for t in tasks] == ids
    assert (tasks[1]["queue"], tasks[1]["priority"], tasks[1]["max_attempts"]) == ("bulk", 5, 3)
    assert [t["state"] for t in tasks] == ["queued", "queued", "waiting"]
    events = [await stream.next() for _ in ids]
    assert [e.event for e in events if e is not None] == ["queued"] * 3
    assert [orjson.loads(e.data)["task_id"] for e in events if e is not None] == ids


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tasks": [{"data": 0}, {"data": 1}, {"data": 2}, {"data": 3, "timeout": -1}]}, None),
        ({"tasks": [{"data": 0}, {"data": 1}, {"data": 2}, {"data": 3, "timeout": "x"}]}, None),
        ({"tasks": [{"data": 0}, 7]}, "tasks[1]"),
        ({"tasks": [{"data": 0}, {"data": 1, "bogus": True}]}, "tasks[1].bogus"),
        ({"tasks": [{"data": 0}, {"data": 1}, {"queue": "q"}]}, "tasks[2].data"),
        ({"tasks": [{"data": 0}, {"data": 1, "delay": -3}]}, "tasks[1].delay"),
        ({"tasks": [{"data": 0}, {"data": 1, "unique_for": 5}]}, "tasks[1].unique_for"),
        ({"tasks": []}, "tasks"),
        ({"tasks": {"data": 1}}, "tasks"),
        ({}, "tasks"),
        ({"tasks": [{"data": 1}], "extra": 1}, "extra"),
    ],
)
async def test_http_bad_batch_is_refused_naming_the_item_and_writes_nothing(
    jobs: Jobs, body: dict[str, Any], field: str | None
) -> None:
    client, server = await jobs.client(task_workers=0)
    response = await client.post("/tasks:batch", json=body)
    await refused(response, 422, field or "tasks[3].timeout")
    assert await all_tasks(client) == []
    stats = await get_json(client, "/stats")
    assert stats["queued"] == 0
    assert stats["tasks"]["waiting"] == 0
    assert server.stats()["last_event_id"] == 0


async def test_a_batch_past_max_queued_is_refused_whole(jobs: Jobs) -> None:
    client, server = await jobs.client(task_workers=0, max_queued=5)
    await post(client, "/tasks:batch", {"tasks": [{"data": n} for n in range(3)]})
    response = await client.post("/tasks:batch", json={"tasks": [{"data": n} for n in range(3)]})
    await refused(response, 503, None)
    assert int(response.headers["Retry-After"]) >= 1
    assert len(await all_tasks(client)) == 3
    with pytest.raises(ServerBusy):
        await server.task_many(range(3))
    assert len(await server.list_tasks()) == 3
    assert len(await server.task_many(range(2))) == 2
