"""Periodic tasks: ``server.schedule(name, cron, data, **options)`` enqueues one task per
due time, none twice across a restart, and the runs missed while stopped at the next start.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import ConfigError, Settings, TaskServer

from .conftest import sse, wait_for
from .jobs_harness import Jobs, get_json, query

EVERY_SECOND = "*/1 * * * * *"


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


def tick(server: TaskServer) -> None:
    server.schedule("tick", EVERY_SECOND, {"beat": True}, queue="cron", priority=3)


async def ticks(db: str) -> list[tuple[float, str, int, str]]:
    """(created_at, queue, priority, data) of every task the schedule enqueued, in id order."""
    rows = await query(
        db, "SELECT created_at, queue, priority, data FROM tasks WHERE name = 'tick' ORDER BY id"
    )
    return [(float(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in rows]


def due_second(created_at: float) -> int:
    """The due time a run created at ``created_at`` was for: a timer may fire a little
    early (uvloop's are in milliseconds) and a slow machine's much later."""
    return math.floor(created_at + 0.25)


async def last_due(db: str) -> float:
    rows = await query(db, "SELECT last_due FROM schedules WHERE name = 'tick'")
    assert len(rows) == 1
    return float(rows[0][0])


async def test_each_due_time_runs_once_across_a_restart_and_missed_runs_catch_up(
    jobs: Jobs,
) -> None:
    db = jobs.settings.db
    client, first = await jobs.client(configure=tick)
    stream = sse(await client.get("/events"))

    async def two_ticks() -> bool:
        return len(await ticks(db)) >= 2

    await wait_for(two_ticks, timeout=5, message="two scheduled runs")
    listed = await get_json(client, "/tasks?limit=1000")
    assert {t["name"] for t in listed["tasks"]} == {"tick"}
    event = await stream.next()
    assert event is not None
    assert event.event == "queued"
    assert orjson.loads(event.data)["queue"] == "cron"
    await first.stop()

    before = await ticks(db)
    stopped_last = await last_due(db)
    # Two due times pass while the server is down (waiting on the clock, not a guess).
    await wait_for(lambda: time.time() >= stopped_last + 2.3, timeout=5, message="the clock")
    restarted = time.time()
    second = await jobs.server(configure=tick)
    missed = list(range(int(stopped_last) + 1, int(restarted) + 1))
    assert len(missed) >= 2

    async def caught_up_and_one_more() -> bool:
        return len(await ticks(db)) >= len(before) + len(missed) + 1

    await wait_for(caught_up_and_one_more, timeout=5, message="catch-up and a regular run")
    await second.stop()

    runs = await ticks(db)
    final_last = await last_due(db)
    first_due = due_second(runs[0][0])
    # One task per due time from the first to the last enqueued: none twice, none lost.
    assert len(runs) == final_last - first_due + 1, (len(runs), first_due, final_last)
    assert runs[: len(before)] == before
    caught_up = [r for r in runs[len(before) :] if r[0] < restarted + 1.5]
    assert len(caught_up) >= len(missed)
    # Runs enqueued on time were created at their due time, each a different one.
    on_time = runs[: len(before)] + runs[len(before) + len(missed) :]
    assert len({due_second(r[0]) for r in on_time}) == len(on_time)
    assert all(r[1:] == ("cron", 3, '{"beat":true}') for r in runs)


async def test_scheduled_runs_are_executed(jobs: Jobs) -> None:
    server = await jobs.server(configure=tick)

    async def one_done() -> bool:
        return any(t.name == "tick" and t.result for t in await server.list_tasks())

    await wait_for(one_done, timeout=5, message="a scheduled run to succeed")
    done = [t for t in await server.list_tasks() if t.result]
    assert done[0].result == {"echo": {"beat": True}}
    assert done[0].queue == "cron"


@pytest.mark.parametrize(
    ("cron", "tz"),
    [
        ("not a cron", "UTC"),
        ("* * *", "UTC"),
        ("61 * * * *", "UTC"),
        ("* * * * * * * *", "UTC"),
        ("*/1 * * * *", "Mars/Olympus_Mons"),
    ],
)
def test_bad_cron_or_zone_is_a_config_error(cron: str, tz: str) -> None:
    server = TaskServer(Settings(task_workers=0))
    with pytest.raises(ConfigError, match="bad cron"):
        server.schedule("nightly", cron, None, tz=tz)


def test_bad_schedule_options_are_a_config_error() -> None:
    server = TaskServer(Settings(task_workers=0))
    with pytest.raises(ConfigError):
        server.schedule("nightly", "0 3 * * *", None, priority="high")


async def test_a_full_queue_during_catch_up_does_not_stop_the_schedules(jobs: Jobs) -> None:
    db = jobs.settings.db
    first = await jobs.server(configure=tick, task_workers=0)

    async def one_tick() -> bool:
        return len(await ticks(db)) >= 1

    await wait_for(one_tick, timeout=5, message="a scheduled run")
    await first.stop()
    queued = len(await ticks(db))
    stopped_last = await last_due(db)
    await wait_for(lambda: time.time() >= stopped_last + 2.3, timeout=5, message="the clock")
    # Room for one more queued task: the first missed run fits, the second is refused.
    second = await jobs.server(configure=tick, task_workers=0, max_queued=queued + 1)

    async def first_catch_up() -> bool:
        return len(await ticks(db)) == queued + 1

    await wait_for(first_catch_up, timeout=5, message="the first missed run")
    for task in await second.list_tasks():
        await second.cancel(task.id)
    emptied = time.time()

    async def scheduling_again() -> bool:
        return any(created > emptied for created, *_ in await ticks(db))

    await wait_for(scheduling_again, timeout=3, message="a run after the queue emptied")


@pytest.mark.parametrize(
    ("alias", "same_as"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_cron_aliases_mean_what_cron_says(alias: str, same_as: str) -> None:
    from taskserver.runtime.periodic import Schedule

    now = time.time()
    alias_schedule, plain = Schedule("a", alias), Schedule("p", same_as)
    alias_schedule.check()
    assert alias_schedule.next_after(now) == plain.next_after(now)
    assert alias_schedule.due_after(now - 400 * 86400, now) == plain.due_after(
        now - 400 * 86400, now
    )


def test_an_unknown_alias_is_refused_by_name() -> None:
    server = TaskServer(Settings(db=":memory:"))
    with pytest.raises(ConfigError, match="@fortnightly"):
        server.schedule("never", "@fortnightly")


async def test_an_hourly_schedule_runs_at_the_top_of_the_hour(jobs: Jobs) -> None:
    # A clock 2 s before the next full hour, so the run comes soon, but not before the
    # server (started after this) has looked at the schedule, even on a slow machine.
    now = time.time()
    offset = (now // 3600 + 1) * 3600 - 2.0 - now

    def clock() -> float:
        return time.time() + offset

    def hourly(server: TaskServer) -> None:
        server.schedule("tick", "@hourly", {"beat": True})

    await jobs.client(configure=hourly, clock=clock)

    async def ran() -> list[tuple[float, str, int, str]]:
        return await ticks(jobs.settings.db)

    (created_at, _, _, data), *_ = await wait_for(ran, timeout=10, message="the hourly run")
    assert orjson.loads(data) == {"beat": True}
    assert await last_due(jobs.settings.db) % 3600 == 0
    assert created_at % 3600 < 60
