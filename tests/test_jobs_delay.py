"""Delays: ``delay`` seconds or an absolute ``available_at``; the task waits until due,
then runs, across a restart too; bad values are refused naming the field.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import Settings, TaskContext, ValidationError

from .conftest import sse
from .jobs_harness import Clock, Jobs, all_tasks, get_json, post, refused, state_of, stored_events


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Runs:
    """A task callback that notes when each task started, by the server's clock."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or time.time
        self.started: dict[int, float] = {}

    async def run(self, ctx: TaskContext) -> Any:
        self.started[ctx.id] = self.clock()
        return ctx.data


async def test_delayed_task_waits_until_due_then_runs(jobs: Jobs) -> None:
    clock = Clock()
    runs = Runs(clock)
    server = await jobs.server(runs.run, clock=clock)
    before = clock()
    task_id = await server.task("later", delay=1000)
    task = await server.get(task_id)
    assert task.state.value == "waiting"
    assert before + 1000 <= task.available_at <= clock() + 1000
    assert server.stats()["tasks"]["waiting"] == 1
    # Work that is due runs meanwhile; the delayed task stays put.
    now_id = await server.task("now")
    await state_of(server, now_id, "succeeded")
    assert (await server.get(task_id)).state.value == "waiting"
    assert task_id not in runs.started

    clock.advance(999, server)
    other = await server.task("now again")
    await state_of(server, other, "succeeded")
    assert (await server.get(task_id)).state.value == "waiting"

    clock.advance(2, server)
    done = await state_of(server, task_id, "succeeded")
    assert runs.started[task_id] >= task.available_at
    assert done.result == "later"
    events = await stored_events(server, task_id)
    assert [e["type"] for e in events] == ["queued", "queued", "started", "finished"]
    assert events[0]["state"] == "waiting"
    assert events[0]["available_at"] == task.available_at
    assert events[1].get("due") is True


async def test_available_at_is_an_absolute_due_time(jobs: Jobs) -> None:
    clock = Clock()
    runs = Runs(clock)
    server = await jobs.server(runs.run, clock=clock)
    due = clock() + 500
    task_id = await server.task("at", available_at=due)
    waiting = await server.get(task_id)
    assert waiting.state.value == "waiting"
    assert waiting.available_at == due
    past = await server.task("past", available_at=clock() - 60)
    await state_of(server, past, "succeeded")
    clock.advance(501, server)
    await state_of(server, task_id, "succeeded")
    assert runs.started[task_id] >= due


async def test_short_real_delay_is_kept(jobs: Jobs) -> None:
    runs = Runs()
    server = await jobs.server(runs.run)
    task_id = await server.task("x", delay=0.2)
    done = await state_of(server, task_id, "succeeded")
    assert runs.started[task_id] >= done.available_at
    assert done.available_at == pytest.approx(done.created_at + 0.2, abs=0.05)
    assert done.started_at is not None
    assert done.started_at >= done.available_at


async def test_due_times_survive_a_restart(jobs: Jobs) -> None:
    clock = Clock()
    first = await jobs.server(clock=clock)
    later = await first.task("later", delay=100)
    soon = await first.task("soon", delay=10)
    await first.stop()

    # Stopped while `soon` came due: it runs at the next start; `later` still waits.
    clock.advance(50)
    runs = Runs(clock)
    second = await jobs.server(runs.run, clock=clock)
    await state_of(second, soon, "succeeded")
    barrier = await second.task("barrier")
    await state_of(second, barrier, "succeeded")
    waiting = await second.get(later)
    assert waiting.state.value == "waiting"
    assert waiting.available_at == pytest.approx(waiting.created_at + 100)
    assert later not in runs.started
    assert second.stats()["tasks"]["waiting"] == 1

    clock.advance(51, second)
    await state_of(second, later, "succeeded")
    assert runs.started[later] >= waiting.available_at


async def test_real_clock_restart_before_due_runs_after_due(jobs: Jobs) -> None:
    first = await jobs.server()
    task_id = await first.task("x", delay=3.0)  # time enough to restart on a slow machine
    due = (await first.get(task_id)).available_at
    await first.stop()
    runs = Runs()
    second = await jobs.server(runs.run)
    restarted = time.time()
    assert restarted < due, "the restart took too long for this test to mean anything"
    assert (await second.get(task_id)).state.value == "waiting"
    await state_of(second, task_id, "succeeded")
    assert runs.started[task_id] >= due


# --- HTTP --------------------------------------------------------------------------------


async def test_http_delay_and_available_at(jobs: Jobs) -> None:
    clock = Clock()
    client, server = await jobs.client(clock=clock)
    created = await post(client, "/tasks", {"data": 1, "delay": 300})
    task = await get_json(client, f"/tasks/{created['id']}")
    assert task["state"] == "waiting"
    assert task["available_at"] == pytest.approx(clock() + 300, abs=5)
    due = clock() + 200
    absolute = await post(client, "/tasks", {"data": 2, "available_at": due})
    task = await get_json(client, f"/tasks/{absolute['id']}")
    assert task["state"] == "waiting"
    assert task["available_at"] == due
    stats = await get_json(client, "/stats")
    assert stats["tasks"]["waiting"] == 2

    stream = sse(await client.get(f"/tasks/{absolute['id']}/events"))
    first = await stream.next()
    assert first is not None
    assert first.event == "queued"
    assert orjson.loads(first.data)["available_at"] == due
    clock.advance(250, server)
    rest = await stream.collect()
    assert [e.event for e in rest] == ["queued", "started", "finished"]
    finished = await get_json(client, f"/tasks/{absolute['id']}")
    assert finished["started_at"] >= due
    # The other one is not due yet.
    assert (await get_json(client, f"/tasks/{created['id']}"))["state"] == "waiting"


async def test_http_202_says_waiting_for_a_delayed_task(jobs: Jobs) -> None:
    client, _ = await jobs.client(task_workers=0)
    created = await post(client, "/tasks", {"data": 1, "delay": 300})
    assert (await get_json(client, f"/tasks/{created['id']}"))["state"] == "waiting"
    assert created["state"] == "waiting"


FAR = 11 * 365 * 86400.0


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"delay": -1}, "delay"),
        ({"delay": "soon"}, "delay"),
        ({"delay": True}, "delay"),
        ({"delay": FAR}, "delay"),
        ({"delay": 5, "available_at": 2_000_000_000}, "delay"),
        ({"available_at": -5}, "available_at"),
        ({"available_at": "tomorrow"}, "available_at"),
        ({"available_at": time.time() + FAR}, "available_at"),
    ],
)
async def test_http_bad_delays_are_refused_and_nothing_is_written(
    jobs: Jobs, options: dict[str, Any], field: str
) -> None:
    client, server = await jobs.client()
    response = await client.post("/tasks", json={"data": 1, **options})
    await refused(response, 422, field)
    assert await all_tasks(client) == []
    assert server.stats()["tasks"]["waiting"] == 0
    assert server.stats()["queued"] == 0


async def test_python_bad_delays_name_the_field(jobs: Jobs) -> None:
    server = await jobs.server()
    for options, field in [
        ({"delay": -0.5}, "delay"),
        ({"delay": 1, "available_at": time.time() + 5}, "delay"),
        ({"available_at": float("nan")}, "available_at"),
    ]:
        with pytest.raises(ValidationError) as caught:
            await server.task(1, **options)
        assert caught.value.field == field
    assert await server.list_tasks() == []
    # delay=0 is "now".
    task_id = await server.task(1, delay=0)
    await state_of(server, task_id, "succeeded")
