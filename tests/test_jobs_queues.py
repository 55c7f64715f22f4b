"""Named queues and priorities: the highest-priority queue first, FIFO within equal
priority, task priority within a queue, per-queue concurrency limits, and a long
import that must not starve short UI tasks (with the backlog in memory or on disk).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskserver import ConfigError, Settings, TaskContext, TaskServer, ValidationError
from taskserver.errors import RetryLater
from taskserver.runtime.options import TaskSpec

from .conftest import wait_for
from .jobs_harness import Gate, Jobs, all_tasks, get_json, post, refused, state_of


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Recorder:
    """A task callback that records the run order and how many run at once, per queue."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.order: list[Any] = []
        self.gate = Gate()
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.total = 0
        self.peak_total = 0
        self.done: Counter[str] = Counter()
        self.started_at: dict[Any, float] = {}
        #: tasks done per queue when each task started
        self.done_at_start: dict[Any, Counter[str]] = {}

    async def run(self, ctx: TaskContext) -> Any:
        data = ctx.data
        queue = data.get("q", "default")
        self.order.append(data["n"])
        self.started_at[data["n"]] = time.monotonic()
        self.done_at_start[data["n"]] = self.done.copy()
        self.running[queue] += 1
        self.total += 1
        self.peak[queue] = max(self.peak[queue], self.running[queue])
        self.peak_total = max(self.peak_total, self.total)
        try:
            if data.get("gate"):
                await self.gate.wait()
            await asyncio.sleep(data.get("sleep", self.sleep))
        finally:
            self.running[queue] -= 1
            self.total -= 1
            self.done[queue] += 1
        return data["n"]


async def test_highest_priority_queue_first_fifo_within_equal_priority(jobs: Jobs) -> None:
    def configure(server: TaskServer) -> None:
        server.queue("low", priority=0)
        server.queue("mid", priority=3)
        server.queue("high", priority=5)

    rec = Recorder()
    server = await jobs.server(rec.run, configure=configure, task_workers=1)
    blocker = await server.task({"n": "blocker", "gate": True}, queue="blocker")
    await wait_for(lambda: rec.order == ["blocker"])
    ids = []
    for n, queue in [("a1", "low"), ("a2", "low"), ("b1", "high"), ("c1", "mid"), ("b2", "high")]:
        ids.append(await server.task({"n": n, "q": queue}, queue=queue))
    ids.append(await server.task({"n": "a3", "q": "low"}, queue="low"))
    rec.gate.open()
    await server.wait([blocker, *ids], 10)
    assert rec.order == ["blocker", "b1", "b2", "c1", "a1", "a2", "a3"]
    snapshot = server.stats()["queues"]
    assert snapshot["high"]["priority"] == 5
    assert snapshot["mid"]["priority"] == 3


async def test_task_priority_orders_within_a_queue(jobs: Jobs) -> None:
    rec = Recorder()
    server = await jobs.server(rec.run, task_workers=1)
    blocker = await server.task({"n": "blocker", "gate": True})
    await wait_for(lambda: rec.order == ["blocker"])
    ids = [
        await server.task({"n": n}, priority=p)
        for n, p in [("p1", 1), ("p5a", 5), ("p3", 3), ("p5b", 5), ("m2", -2), ("p0", 0)]
    ]
    rec.gate.open()
    await server.wait([blocker, *ids], 10)
    assert rec.order == ["blocker", "p5a", "p5b", "p3", "p1", "p0", "m2"]


async def test_backlog_on_disk_runs_in_priority_order_after_restart(jobs: Jobs) -> None:
    first = await jobs.server(task_workers=0)
    specs = [TaskSpec({"n": n}, {"priority": p}) for n, p in enumerate([0, 2, 1, 2, 0, 9, 1, 0])]
    await first.task_many(specs)
    await first.stop()
    rec = Recorder()
    second = await jobs.server(rec.run, task_workers=1, ready_window=10)
    await wait_for(lambda: second.stats()["succeeded"] == 8)
    assert rec.order == [5, 1, 3, 2, 6, 0, 4, 7]


@pytest.mark.parametrize("restart", [False, True], ids=["live", "after-restart"])
async def test_backlog_paged_in_from_disk_runs_each_task_once(jobs: Jobs, restart: bool) -> None:
    runs: Counter[int] = Counter()

    async def task(ctx: TaskContext) -> None:
        runs[ctx.id] += 1
        await asyncio.sleep(0)

    if restart:
        first = await jobs.server(task_workers=0, ready_window=4)
        await first.task_many(range(40))
        await first.stop()
        server = await jobs.server(task, task_workers=2, ready_window=4)
    else:
        server = await jobs.server(task, task_workers=2, ready_window=4)
        await server.task_many(range(40))
    await wait_for(lambda: server.stats()["succeeded"] >= 40, message="40 tasks to succeed")
    # Let any duplicate a stale page admitted run too, then look.
    extra = await server.task("barrier")
    await state_of(server, extra, "succeeded")
    await wait_for(lambda: server.stats()["running"] == 0)
    assert sorted(runs) == list(range(1, 42))
    assert max(runs.values()) == 1, {k: v for k, v in runs.items() if v > 1}
    assert server.stats()["tasks"]["queued"] == 0
    assert server.stats()["succeeded"] == 41


async def test_queue_concurrency_limit_holds_and_other_queues_still_run(jobs: Jobs) -> None:
    def configure(server: TaskServer) -> None:
        server.queue("limited", concurrency=2)

    rec = Recorder(sleep=0.03)
    server = await jobs.server(rec.run, configure=configure, task_workers=4)
    limited = [TaskSpec({"n": f"l{i}", "q": "limited"}, {"queue": "limited"}) for i in range(12)]
    free = [TaskSpec({"n": f"f{i}", "q": "free"}, {"queue": "free"}) for i in range(12)]
    submitted = await server.task_many([*limited, *free])
    await server.wait([s.id for s in submitted], 20)
    assert rec.peak["limited"] == 2
    # The two other workers were not idle: the free queue ran beside the limited one.
    assert rec.peak_total >= 3
    assert server.stats()["queues"]["limited"]["concurrency"] == 2
    assert server.stats()["queues"]["limited"]["running"] == 0


def test_bad_queue_declarations_are_config_errors() -> None:
    server = TaskServer(Settings(task_workers=0))
    with pytest.raises(ConfigError, match="concurrency"):
        server.queue("x", concurrency=0)


@pytest.mark.parametrize("ready_window", [10_000, 10])
async def test_long_import_does_not_starve_ui_tasks(jobs: Jobs, ready_window: int) -> None:
    def configure(server: TaskServer) -> None:
        server.queue("import", priority=0)
        server.queue("ui", priority=10)

    rec = Recorder(sleep=0.01)
    client, _ = await jobs.client(
        rec.run, configure=configure, task_workers=2, ready_window=ready_window
    )
    batch = [{"data": {"n": f"i{i}", "q": "import"}, "queue": "import"} for i in range(200)]
    await post(client, "/tasks:batch", {"tasks": batch})
    if ready_window == 10:
        stats = await get_json(client, "/stats")
        assert stats["backlog_on_disk"] is True
        assert stats["queues"]["import"]["in_memory"] <= 10
        assert stats["queues"]["import"]["queued"] >= 150  # from the store: the rest wait on disk
    await wait_for(lambda: rec.done["import"] >= 4, message="the import to be under way")
    enqueued = time.monotonic()
    created = await post(client, "/tasks", {"data": {"n": "ui", "q": "ui"}, "queue": "ui"})
    # Counted once the ui task is durable (so ready): the round trip before that, which a
    # slow machine can stretch, is not the scheduler's.
    done_when_ready = rec.done["import"]
    await wait_for(lambda: "ui" in rec.order, message="the ui task to start")
    imports_meanwhile = rec.done_at_start["ui"]["import"] - done_when_ready
    latency = rec.started_at["ui"] - enqueued
    # Only the import tasks running when the ui task became ready finish before a worker
    # takes it (one per worker); the import has ~190 tasks, ~1 s, to go.
    assert imports_meanwhile <= 3, imports_meanwhile
    assert latency < 0.9, latency
    assert rec.done_at_start["ui"]["import"] < 100
    task = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert task["state"] == "succeeded"
    assert task["queue"] == "ui"


async def test_http_queue_and_priority_fields(jobs: Jobs) -> None:
    client, _ = await jobs.client(task_workers=0)
    created = await post(
        client, "/tasks", {"data": 1, "queue": "reports.daily", "priority": -7, "name": "r"}
    )
    task = await get_json(client, f"/tasks/{created['id']}")
    assert (task["queue"], task["priority"], task["name"]) == ("reports.daily", -7, "r")
    default = await post(client, "/tasks", {"data": 2})
    task = await get_json(client, f"/tasks/{default['id']}")
    assert (task["queue"], task["priority"]) == ("default", 0)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"queue": "has space"}, "queue"),
        ({"queue": 7}, "queue"),
        ({"queue": "x" * 201}, "queue"),
        ({"priority": 1001}, "priority"),
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"name": "a b"}, "name"),
    ],
)
async def test_http_bad_queue_or_priority_is_refused_and_nothing_written(
    jobs: Jobs, options: dict[str, Any], field: str
) -> None:
    client, server = await jobs.client(task_workers=0)
    response = await client.post("/tasks", json={"data": 1, **options})
    await refused(response, 422, field)
    assert await all_tasks(client) == []
    assert server.stats()["tasks"]["queued"] == 0


async def test_python_bad_queue_names_the_field(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    with pytest.raises(ValidationError) as caught:
        await server.task(1, queue="no good")
    assert caught.value.field == "queue"
    with pytest.raises(ValidationError) as caught:
        await server.task(1, priority=5000)
    assert caught.value.field == "priority"
    assert await server.list_tasks() == []
    task_id = await server.task(1, queue="ok", priority=3)
    task = await state_of(server, task_id, "queued")
    assert (task.queue, task.priority) == ("ok", 3)


async def test_http_empty_queue_name_is_refused(jobs: Jobs) -> None:
    client, _ = await jobs.client(task_workers=0)
    response = await client.post("/tasks", json={"data": 1, "queue": ""})
    await refused(response, 422, "queue")
    assert await all_tasks(client) == []


async def test_queue_and_name_defaults_for_timeout_and_priority(jobs: Jobs) -> None:
    async def task(ctx: TaskContext) -> Any:
        await asyncio.sleep(ctx.data)
        return ctx.data

    def configure(server: TaskServer) -> None:
        server.queue("strict", timeout=0.1)
        server.defaults("report", queue="strict", priority=7, timeout=5.0)

    server = await jobs.server(task, configure=configure)
    too_slow = await server.task(2, queue="strict")
    failed = await state_of(server, too_slow, "failed")
    assert failed.timeout == 0.1
    assert failed.error == "TimeoutError: the task ran longer than its timeout of 0.1s"
    named = await server.task(0.2, name="report")
    done = await state_of(server, named, "succeeded")
    assert (done.queue, done.priority, done.timeout) == ("strict", 7, 5.0)
    overridden = await server.task(0, name="report", priority=-1, timeout=1)
    ended = await state_of(server, overridden, "succeeded")
    assert (ended.priority, ended.timeout) == (-1, 1.0)


@pytest.mark.parametrize("restart", [False, True], ids=["live", "restart"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_every_task_succeeds_once_under_paging_retries_and_delays(
    jobs: Jobs, seed: int, restart: bool
) -> None:
    rng = random.Random(seed)
    calls: Counter[int] = Counter()
    successes: Counter[int] = Counter()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    async def task(ctx: TaskContext) -> Any:
        data = ctx.data
        calls[ctx.id] += 1
        running[data["q"]] += 1
        peak[data["q"]] = max(peak[data["q"]], running[data["q"]])
        try:
            await asyncio.sleep(data["sleep"])
            if data["later"] and calls[ctx.id] == 1:
                raise RetryLater(0.01)
            if data["fail"] and ctx.attempt == 1:
                raise ValueError("once")
        finally:
            running[data["q"]] -= 1
        successes[ctx.id] += 1
        return ctx.id

    def configure(server: TaskServer) -> None:
        server.queue("bulk", priority=0)
        server.queue("fast", priority=5)
        server.queue("single", priority=1, concurrency=1)

    server = await jobs.server(task, configure=configure, task_workers=3, ready_window=3)
    specs = []
    for _ in range(150):
        queue = rng.choice(["bulk", "bulk", "fast", "single"])
        data = {
            "q": queue,
            "sleep": rng.choice([0, 0, 0.002]),
            "fail": rng.random() < 0.2,
            "later": rng.random() < 0.1,
        }
        options: dict[str, Any] = {
            "queue": queue,
            "priority": rng.randint(-2, 2),
            "max_attempts": 2,
            "retry": {"base": 0.01, "jitter": 0},
        }
        if rng.random() < 0.1:
            options["delay"] = 0.02
        specs.append(TaskSpec(data, options))
    ids: list[int] = []
    for start in range(0, 150, 50):
        ids += [s.id for s in await server.task_many(specs[start : start + 50])]
        if restart and start == 50:
            await wait_for(lambda: sum(calls.values()) >= 20, message="some work done")
            await server.stop()  # running tasks finish in the grace period
            server = await jobs.server(task, configure=configure, task_workers=3, ready_window=3)
    await server.wait(ids, 30)
    assert sorted(successes) == sorted(ids)
    assert max(successes.values()) == 1, {k: v for k, v in successes.items() if v > 1}
    assert peak["single"] == 1
    await wait_for(lambda: server.stats()["running"] == 0)
    on_disk = {s.value: n for s, n in (await server.store.count_by_state()).items()}
    assert on_disk["succeeded"] == 150
    assert server.stats()["tasks"] == on_disk
