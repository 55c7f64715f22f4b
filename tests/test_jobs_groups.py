"""Serial groups: tasks of one group never overlap and run in enqueue order; other
tasks are not held up by them; a group task that retries or waits keeps its group
blocked until it ends, across a restart too.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import Settings, TaskContext, TaskServer, ValidationError
from taskserver.errors import RetryLater
from taskserver.models import RetryPolicy
from taskserver.runtime.options import TaskSpec

from .conftest import sse, wait_for
from .jobs_harness import Clock, Gate, Jobs, all_tasks, get_json, post, refused, state_of


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Spans:
    """Records when each task ran (monotonic start and end), and the start order."""

    def __init__(self, sleep: float = 0.02) -> None:
        self.sleep = sleep
        self.order: list[int] = []
        self.spans: dict[int, tuple[float, float]] = {}
        self.gates: dict[str, Gate] = {}
        self.attempts: dict[int, int] = {}
        self.calls: Counter[int] = Counter()

    def gate(self, name: str) -> Gate:
        return self.gates.setdefault(name, Gate())

    async def run(self, ctx: TaskContext) -> Any:
        data = ctx.data if isinstance(ctx.data, dict) else {}
        start = time.monotonic()
        self.order.append(ctx.id)
        self.attempts[ctx.id] = ctx.attempt
        self.calls[ctx.id] += 1
        if "open" in data:
            self.gate(data["open"]).open()
        try:
            if "wait" in data:
                await self.gate(data["wait"]).wait(timeout=data.get("wait_timeout", 20.0))
            if ctx.attempt <= data.get("fail", 0):
                raise ValueError("not yet")
            if self.calls[ctx.id] <= data.get("later", 0):
                raise RetryLater(1000)
            await asyncio.sleep(data.get("sleep", self.sleep))
        finally:
            self.spans[ctx.id] = (start, time.monotonic())
        return ctx.id


def assert_serial(spans: Spans, ids: list[int]) -> None:
    """``ids`` ran one after the other, in this order, without overlapping."""
    ran = [i for i in spans.order if i in ids]
    assert ran == ids
    for earlier, later in itertools.pairwise(ids):
        assert spans.spans[later][0] >= spans.spans[earlier][1], (earlier, later)


async def test_group_tasks_never_overlap_and_run_in_enqueue_order(jobs: Jobs) -> None:
    spans = Spans()
    server = await jobs.server(spans.run, task_workers=4)
    # Priorities and queues differ: inside a group, enqueue order wins.
    ids = []
    for i in range(6):
        queue = "a" if i % 2 else "b"
        ids.append(await server.task({}, serial_group="g", priority=i, queue=queue))
    await server.wait(ids, 10)
    assert_serial(spans, ids)


async def test_other_tasks_run_beside_a_group(jobs: Jobs) -> None:
    spans = Spans()
    server = await jobs.server(spans.run, task_workers=2)
    # The first group task waits until the plain task, enqueued after the whole group, ran.
    group = [await server.task({"wait": "plain ran"}, serial_group="g")]
    group += [await server.task({}, serial_group="g") for _ in range(3)]
    plain = await server.task({"open": "plain ran"})
    other_group = await server.task({"open": "other ran"}, serial_group="h")
    await server.wait([*group, plain, other_group], 10)
    assert_serial(spans, group)
    assert spans.spans[plain][0] < spans.spans[group[0]][1]
    assert spans.spans[other_group][0] < spans.spans[group[1]][0]


async def test_a_long_group_does_not_block_other_tasks_of_its_queue(jobs: Jobs) -> None:
    spans = Spans()
    server = await jobs.server(spans.run, task_workers=2, ready_window=4)
    head = await server.task({"wait": "plain ran", "wait_timeout": 3.0}, serial_group="g")
    await wait_for(lambda: head in spans.order)
    rest = [s.id for s in await server.task_many([TaskSpec({}, {"serial_group": "g"})] * 8)]
    plain = await server.task({"open": "plain ran"})
    await server.wait([head, *rest, plain], 20)
    # The plain task ran while the group's head still ran (it waited up to 3 s for it).
    assert spans.spans[plain][0] < spans.spans[head][1]
    assert (await server.get(head)).state.value == "succeeded"


@pytest.mark.parametrize("how", ["retrying", "waiting"])
async def test_a_group_task_that_retries_keeps_the_group_blocked(jobs: Jobs, how: str) -> None:
    clock = Clock()
    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, clock=clock, task_workers=2)
    data = {"fail": 1} if how == "retrying" else {"later": 1}
    first = await server.task(
        data, serial_group="g", max_attempts=2, retry=RetryPolicy(base=1000, cap=5000, jitter=0)
    )
    second = await server.task({}, serial_group="g")
    await state_of(server, first, how)
    # A plain task enqueued after `second` runs and ends: had `second` been eligible,
    # an idle worker would have taken it first (same queue, same priority, lower id).
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    assert (await server.get(second)).state.value == "queued"
    assert second not in spans.order

    clock.advance(1001, server)
    await server.wait([first, second], 10)
    assert [i for i in spans.order if i in (first, second)] == [first, first, second]
    first_done = await server.get(first)
    second_done = await server.get(second)
    assert first_done.finished_at is not None
    assert second_done.started_at is not None
    assert second_done.started_at >= first_done.finished_at


async def test_a_retrying_group_owner_still_holds_the_group_after_a_restart(jobs: Jobs) -> None:
    clock = Clock()
    spans = Spans(sleep=0)
    policy = RetryPolicy(base=1000, cap=5000, jitter=0)
    first_server = await jobs.server(spans.run, clock=clock)
    first = await first_server.task({"fail": 1}, serial_group="g", max_attempts=2, retry=policy)
    await state_of(first_server, first, "retrying")
    await first_server.stop()
    # Enqueued while the owner is retrying, after a restart.
    offline = await jobs.server(task_workers=0, clock=clock)
    second = await offline.task({}, serial_group="g")
    await offline.stop()

    server = await jobs.server(spans.run, clock=clock)
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    assert (await server.get(second)).state.value == "queued"
    clock.advance(1001, server)
    await server.wait([first, second], 10)
    first_done, second_done = await server.get(first), await server.get(second)
    assert first_done.finished_at is not None
    assert second_done.started_at is not None
    assert second_done.started_at >= first_done.finished_at


async def test_cancelling_the_running_group_task_lets_the_next_one_run(jobs: Jobs) -> None:
    spans = Spans()
    server = await jobs.server(spans.run)
    first = await server.task({"wait": "never"}, serial_group="g")
    second = await server.task({}, serial_group="g")
    await wait_for(lambda: first in spans.order)
    cancelled = await server.cancel(first)
    assert cancelled.state.value == "cancelled"
    assert await server.task_wait({"sleep": 0}, 10, serial_group="g") is not None
    assert (await state_of(server, second, "succeeded")).result == second


# --- HTTP ------------------------------------------------------------------------------


async def test_http_serial_group_field_and_event_order(jobs: Jobs) -> None:
    spans = Spans(sleep=0.01)
    client, _ = await jobs.client(spans.run, task_workers=3)
    stream = sse(await client.get("/events"))
    ids = [
        (await post(client, "/tasks", {"data": {}, "serial_group": "mailbox:42"}))["id"]
        for _ in range(3)
    ]
    task = await get_json(client, f"/tasks/{ids[0]}")
    assert task["serial_group"] == "mailbox:42"
    seen: list[tuple[str | None, int]] = []
    while sum(1 for kind, _ in seen if kind == "finished") < 3:
        event = await stream.next()
        assert event is not None
        payload = orjson.loads(event.data)
        if event.event in ("started", "finished"):
            seen.append((event.event, payload["task_id"]))
    assert seen == [(kind, i) for i in ids for kind in ("started", "finished")]


@pytest.mark.parametrize("group", ["", "a b", 7, "x" * 201])
async def test_http_bad_serial_group_is_refused_and_nothing_written(jobs: Jobs, group: Any) -> None:
    client, _ = await jobs.client(task_workers=0)
    response = await client.post("/tasks", json={"data": 1, "serial_group": group})
    await refused(response, 422, "serial_group")
    assert await all_tasks(client) == []


async def test_python_bad_serial_group_names_the_field(jobs: Jobs) -> None:
    server: TaskServer = await jobs.server(task_workers=0)
    with pytest.raises(ValidationError) as caught:
        await server.task(1, serial_group="no spaces please")
    assert caught.value.field == "serial_group"
    assert await server.list_tasks() == []


async def test_a_delayed_group_task_holds_its_group_until_it_runs(jobs: Jobs) -> None:
    clock = Clock()
    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, clock=clock)
    delayed = await server.task({}, serial_group="g", delay=1000)
    after = await server.task({}, serial_group="g")
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    # Enqueue order holds in the group: the later task waits for the delayed one.
    assert (await server.get(after)).state.value == "queued"
    clock.advance(1001, server)
    await server.wait([delayed, after], 10)
    assert_serial(spans, [delayed, after])


class Ledger:
    """Every attempt of every task, as (task id, group, start, end, outcome)."""

    def __init__(self) -> None:
        self.attempts: list[tuple[int, str | None, float, float, str]] = []
        self.calls: Counter[int] = Counter()

    async def run(self, ctx: TaskContext) -> Any:
        data = ctx.data
        start = time.monotonic()
        self.calls[ctx.id] += 1
        outcome = "ok"
        try:
            await asyncio.sleep(data["sleep"])
            if data["later"] and self.calls[ctx.id] == 1:
                outcome = "later"
                raise RetryLater(0.01)
            if ctx.attempt <= data["fail"]:
                outcome = "failed"
                raise ValueError("once more")
        finally:
            self.attempts.append((ctx.id, data["group"], start, time.monotonic(), outcome))
        return ctx.id


@pytest.mark.parametrize("restart", ["live", "restart", "restart-between-batches"])
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_groups_stay_serial_and_ordered_under_load(
    jobs: Jobs, seed: int, restart: str
) -> None:
    rng = random.Random(seed)
    ledger = Ledger()
    server = await jobs.server(ledger.run, task_workers=3, ready_window=4)
    specs = []
    for _ in range(60):
        group = rng.choice(["a", "b", "c", None, None])
        data = {
            "group": group,
            "sleep": rng.choice([0, 0.002, 0.005]),
            "fail": rng.random() < 0.2,
            "later": rng.random() < 0.1,
        }
        options: dict[str, Any] = {
            "priority": rng.randint(-3, 3),
            "queue": rng.choice(["q1", "q2"]),
            "max_attempts": 2,
            "retry": {"base": 0.01, "jitter": 0},
        }
        if rng.random() < 0.1:
            options["delay"] = 0.02
        if group is not None:
            options["serial_group"] = group
        specs.append(TaskSpec(data, options))
    ids = [s.id for s in await server.task_many(specs[:30])]
    if restart == "restart":
        ids += [s.id for s in await server.task_many(specs[30:])]
    if restart != "live":
        # Stop with work running, retrying, delayed and queued; go on in a new server.
        await wait_for(lambda: len(ledger.attempts) >= 8, message="some work done")
        await server.stop()
        server = await jobs.server(ledger.run, task_workers=3, ready_window=4)
    if restart != "restart":
        ids += [s.id for s in await server.task_many(specs[30:])]
    await server.wait(ids, 20)

    successes = Counter(task_id for task_id, *_, outcome in ledger.attempts if outcome == "ok")
    assert sorted(successes) == sorted(ids)
    assert max(successes.values()) == 1
    for group in ("a", "b", "c"):
        runs = sorted((a for a in ledger.attempts if a[1] == group), key=lambda a: a[2])
        for earlier, later in itertools.pairwise(runs):
            assert later[2] >= earlier[3], f"group {group}: {earlier} overlaps {later}"
        finished = [a[0] for a in runs if a[4] == "ok"]
        assert finished == sorted(finished), f"group {group} ran out of order"
    await wait_for(lambda: server.stats()["running"] == 0)
    on_disk = {s.value: n for s, n in (await server.store.count_by_state()).items()}
    assert on_disk["succeeded"] == 60
    assert server.stats()["tasks"] == on_disk


async def test_a_group_owner_due_again_while_its_queue_has_a_backlog_still_runs(
    jobs: Jobs,
) -> None:
    clock = Clock()
    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, clock=clock, task_workers=1, ready_window=2)
    policy = RetryPolicy(base=1000, cap=5000, jitter=0)
    owner = await server.task({"fail": 1}, serial_group="g", max_attempts=2, retry=policy)
    await state_of(server, owner, "retrying")
    behind = await server.task({}, serial_group="g")
    # The only worker is held, and the window (2) is full: the queue has a backlog on disk.
    blocker = await server.task({"wait": "go"})
    await wait_for(lambda: blocker in spans.order)
    plain = [s.id for s in await server.task_many([{}] * 4)]
    await wait_for(lambda: server.stats()["backlog_on_disk"], message="a backlog on disk")
    # The owner comes due while the backlog is there.
    clock.advance(1001, server)
    await state_of(server, owner, "queued")
    spans.gate("go").open()
    await server.wait([blocker, *plain], 10)
    await server.wait([owner, behind], 3)
    assert [i for i in spans.order if i in (owner, behind)] == [owner, owner, behind]


async def test_a_delayed_group_task_does_not_jump_older_ones(jobs: Jobs) -> None:
    clock = Clock()
    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, clock=clock)
    older, delayed = (
        s.id
        for s in await server.task_many(
            [
                TaskSpec({}, {"serial_group": "g"}),
                TaskSpec({}, {"serial_group": "g", "delay": 1000}),
            ]
        )
    )
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    # The older task was due now and first in the group: it must not wait 1000 s.
    assert (await server.get(older)).state.value == "succeeded"
    clock.advance(1001, server)
    await server.wait([older, delayed], 5)
    assert_serial(spans, [older, delayed])


async def test_after_a_restart_a_delayed_group_task_does_not_jump_older_ones(
    jobs: Jobs,
) -> None:
    clock = Clock()
    first = await jobs.server(task_workers=0, clock=clock)
    older = await first.task({}, serial_group="g")
    delayed = await first.task({}, serial_group="g", delay=1000)
    await first.stop()
    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, clock=clock)
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    assert (await server.get(older)).state.value == "succeeded"
    clock.advance(1001, server)
    await server.wait([older, delayed], 5)
    assert_serial(spans, [older, delayed])


async def test_after_a_restart_a_new_group_task_waits_for_older_ones_on_disk(
    jobs: Jobs,
) -> None:
    def configure(server: TaskServer) -> None:
        server.queue("fast", priority=10)

    first = await jobs.server(task_workers=0, configure=configure)
    plain = [
        s.id
        for s in await first.task_many(
            [TaskSpec({"wait": "go"}, {"queue": "slow", "priority": 5})] * 4
        )
    ]
    older = await first.task({}, queue="slow", serial_group="g")
    await first.stop()

    spans = Spans(sleep=0)
    server = await jobs.server(spans.run, configure=configure, task_workers=2, ready_window=2)
    # Both workers are held; the older group task waits on disk behind the window.
    await wait_for(lambda: len(spans.order) == 2, message="two plain tasks running")
    newer = await server.task({}, queue="fast", serial_group="g")
    spans.gate("go").open()
    await server.wait([*plain, older, newer], 10)
    assert_serial(spans, [older, newer])
