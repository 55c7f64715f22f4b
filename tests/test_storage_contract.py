"""The storage contract (``taskserver/storage/backend.py``), the same cases for every backend.

Each case drives the group-commit engine over one backend, as the server does.
Adding a backend is one entry in ``BACKENDS`` (and ``DURABLE`` if it survives a
crash): the address ``Store`` opens it by.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest

from taskserver import EventType, TaskState
from taskserver.models import Task
from taskserver.storage import NewTask, Store

#: backend name -> its address for a fresh database in ``tmp`` (``request`` gives fixtures)
BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], str]] = {
    "sqlite-file": lambda tmp, request: str(tmp / "contract.db"),
    "sqlite-memory": lambda tmp, request: ":memory:",
    "postgresql": lambda tmp, request: request.getfixturevalue("postgres").create_database(),
}
#: backends whose committed data outlives the process
DURABLE = ("sqlite-file", "postgresql")


class Clock:
    """An injected clock the cases move by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def address(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return BACKENDS[backend](tmp_path, request)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(address: str, clock: Clock) -> AsyncIterator[Store]:
    opened = Store(address, clock=clock)
    await opened.open()
    yield opened
    await opened.close()


def new(data: object = None, **options: object) -> NewTask:
    return NewTask(orjson.dumps(data).decode(), data, 3, None, **options)  # type: ignore[arg-type]


async def insert(store: Store, *items: NewTask) -> list[Task]:
    tasks, committed = store.insert_tasks(list(items))
    await committed
    return tasks


async def all_events(store: Store, **filters: object) -> list[tuple[int, int | None, str | None]]:
    events = await store.events_after(0, limit=10_000, **filters)  # type: ignore[arg-type]
    return [(e.id, e.task_id, e.type) for e in events]


async def test_ids_increase_across_batches_and_events_follow_commit_order(store: Store) -> None:
    first = await insert(store, new(1), new(2))
    second = await insert(store, new(3))
    ids = [t.id for t in first + second]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    events = await all_events(store)
    assert [e[1] for e in events] == ids  # one queued event per task, in commit order
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    assert store.committed_event_id == events[-1][0] == store.last_event_id


@pytest.mark.parametrize("durable", DURABLE)
async def test_ids_are_never_reused_after_a_purge_and_a_restart(
    durable: str, tmp_path: Path, clock: Clock, request: pytest.FixtureRequest
) -> None:
    address = BACKENDS[durable](tmp_path, request)
    first = Store(address, clock=clock)
    await first.open()
    tasks = await insert(first, new(1), new(2))
    for task in tasks:
        task.state, task.finished_at = TaskState.SUCCEEDED, clock.now
        await first.update_task(task, EventType.FINISHED)
    clock.now += 10
    assert await first.purge((TaskState.SUCCEEDED,), clock.now) == 2
    last_event = first.last_event_id
    await first.close()
    second = Store(address, clock=clock)
    opened = await second.open()
    try:
        assert opened.counts[TaskState.SUCCEEDED] == 0
        (task,) = await insert(second, new(3))
        assert task.id > max(t.id for t in tasks)
        assert second.last_event_id > last_event
    finally:
        await second.close()


async def test_events_after_pages_filters_and_mixes_published_updates(store: Store) -> None:
    (a,) = await insert(store, new("a"))
    event, committed = store.publish_update(("https://example.com/x",), "hello", uid="u1")
    await committed
    (b,) = await insert(store, new("b"))
    everything = await all_events(store)
    assert [e[1] for e in everything] == [a.id, None, b.id]
    pages: list[int] = []
    after = 0
    while page := await store.events_after(after, limit=2):
        pages += [e.id for e in page]
        after = page[-1].id
    assert pages == [e[0] for e in everything]  # nothing missed, nothing repeated
    assert [e[1] for e in await all_events(store, tasks_only=True)] == [a.id, b.id]
    assert [e[1] for e in await all_events(store, task_id=b.id)] == [b.id]
    assert await store.find_event("u1") == event.id
    assert await store.find_event("nobody") is None


async def test_conditional_moves_change_only_what_they_find(store: Store, clock: Clock) -> None:
    (task,) = await insert(store, new("x"))
    assert await store.cancel_pending(task.id) is TaskState.QUEUED
    assert await store.cancel_pending(task.id) is None  # already cancelled
    assert (await store.get_task(task.id)).state is TaskState.CANCELLED  # type: ignore[union-attr]
    assert await store.retry_ended(task.id) is TaskState.CANCELLED
    again = await store.get_task(task.id)
    assert again is not None
    assert again.state is TaskState.QUEUED
    assert again.attempts == 0
    assert await store.retry_ended(task.id) is None  # queued is not retryable
    assert await store.cancel_pending(10_000) is None  # no such task
    types = [e[2] for e in await all_events(store, task_id=task.id)]
    assert types == ["queued", "cancelled", "queued"]  # moves that did not move add nothing


async def test_a_moves_event_names_the_tasks_queue(store: Store) -> None:
    # What a subscriber reads of a cancel or a retry says which queue the task is in.
    (task,) = await insert(store, new("x", queue="emails"))
    await store.cancel_pending(task.id)
    await store.retry_ended(task.id)
    events = await store.events_after(0, limit=100, task_id=task.id)
    assert [(e.type, orjson.loads(e.json)["queue"]) for e in events] == [
        ("queued", "emails"),
        ("cancelled", "emails"),
        ("queued", "emails"),
    ]


async def test_list_tasks_pages_both_ways_and_by_state(store: Store) -> None:
    tasks = await insert(store, *(new(n) for n in range(25)))
    ids = [t.id for t in tasks]
    await store.cancel_pending(ids[3])
    seen: list[int] = []
    after = 0
    while page := await store.list_tasks(state=None, after=after, limit=10):
        seen += [t.id for t in page]
        after = page[-1].id
    assert seen == ids
    newest = await store.list_tasks(state=None, after=0, limit=5, before=ids[-1] + 1)
    assert [t.id for t in newest] == ids[::-1][:5]
    cancelled = await store.list_tasks(state=TaskState.CANCELLED, after=0, limit=10)
    assert [t.id for t in cancelled] == [ids[3]]
    assert await store.ids_in_state(TaskState.QUEUED, 3) == [i for i in ids if i != ids[3]][:3]
    counts = await store.count_by_state()
    assert (counts[TaskState.QUEUED], counts[TaskState.CANCELLED]) == (24, 1)


async def test_list_tasks_filters_by_queue_name_and_unique_key(store: Store) -> None:
    a, b, c, d = await insert(
        store,
        new(1, queue="mail", name="send"),
        new(2, queue="mail", name="bounce", unique_key="k-2"),
        new(3, queue="pdf", name="send"),
        new(4, queue="mail", name="send"),
    )
    await store.cancel_pending(d.id)

    async def ids(**filters: object) -> list[int]:
        page = await store.list_tasks(after=0, limit=10, **filters)  # type: ignore[arg-type]
        return [t.id for t in page]

    assert await ids(state=None, queue="mail") == [a.id, b.id, d.id]
    assert await ids(state=None, queue="mail", name="send") == [a.id, d.id]
    assert await ids(state=TaskState.QUEUED, queue="mail", name="send") == [a.id]
    assert await ids(state=None, unique_key="k-2") == [b.id]
    assert await ids(state=None, name="send", before=d.id) == [c.id, a.id]
    first = await store.list_tasks(state=None, after=0, limit=1, queue="mail")
    rest = await store.list_tasks(state=None, after=first[0].id, limit=10, queue="mail")
    assert [t.id for t in first + rest] == [a.id, b.id, d.id]


async def test_purge_of_a_selection_deletes_only_those_ids(store: Store, clock: Clock) -> None:
    one, two, three = await insert(store, new(1), new(2), new(3))
    for task in (one, two, three):
        await store.cancel_pending(task.id)
    clock.now += 1
    assert await store.purge((TaskState.CANCELLED,), clock.now, ids=[one.id, three.id]) == 2
    assert await store.get_task(one.id) is None
    assert await store.get_task(two.id) is not None
    assert await all_events(store, task_id=three.id) == []


@pytest.mark.parametrize("durable", DURABLE)
async def test_paused_queues_are_kept_until_resumed(
    durable: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    address = BACKENDS[durable](tmp_path, request)
    first = Store(address)
    assert (await first.open()).paused_queues == []
    await first.pause_queue("mail", True)
    await first.pause_queue("mail", True)  # idempotent
    await first.pause_queue("pdf", True)
    await first.pause_queue("pdf", False)
    await first.pause_queue("never-paused", False)
    await first.close()
    second = Store(address)
    try:
        assert (await second.open()).paused_queues == ["mail"]
    finally:
        await second.close()


async def test_purge_deletes_ended_tasks_before_the_cutoff_with_their_events(
    store: Store, clock: Clock
) -> None:
    old, young, running = await insert(store, new(1), new(2), new(3))
    for task in (old, young):
        task.state, task.finished_at = TaskState.FAILED, clock.now
        await store.update_task(task, EventType.FAILED, {"error": "x"})
        clock.now += 100
    with pytest.raises(ValueError, match="only deletes ended tasks"):
        store.purge((TaskState.RUNNING,), clock.now)
    assert await store.purge((TaskState.FAILED,), clock.now - 150, chunk=10) == 1
    assert await store.get_task(old.id) is None
    assert await all_events(store, task_id=old.id) == []
    assert (await store.get_task(young.id)) is not None
    assert (await store.get_task(running.id)) is not None
    assert await store.trim_events(before=None, keep=1) >= 1
    assert len(await all_events(store)) == 1


async def test_reads_in_a_batch_see_its_commit(store: Store, clock: Clock) -> None:
    got: dict[str, list[Task]] = {}
    done = asyncio.Event()

    def keep(name: str) -> Callable[[list[Task]], None]:
        def deliver(page: list[Task]) -> None:
            got[name] = page
            if len(got) == 3:
                done.set()

        return deliver

    later = new("later", available_at=clock.now + 60)
    items = [new("low"), new("high", priority=5), new("g", serial_group="g"), later]
    tasks, committed = store.insert_tasks(items)
    store.page_queued("default", 10, [], keep("page"))
    store.group_head("g", keep("head"))
    store.due_tasks(clock.now + 60, 10, keep("due"))
    await committed
    await asyncio.wait_for(done.wait(), 5)
    assert [t.data for t in got["page"]] == ["high", "low", "g"]  # priority, then id
    assert [t.id for t in got["head"]] == [tasks[2].id]
    assert [t.id for t in got["due"]] == [tasks[3].id]
    assert tasks[3].state is TaskState.WAITING
    if store.shared:
        # Shared: the page claimed its tasks for this server, and the due read promoted.
        claimed = [await store.get_task(t.id) for t in got["page"]]
        assert [(t.state, t.attempts) for t in claimed if t] == [(TaskState.RUNNING, 1)] * 3
        assert await store.next_due() is None
    else:
        assert await store.next_due() == clock.now + 60


async def test_open_returns_what_the_server_starts_from(
    backend: str, address: str, clock: Clock
) -> None:
    first = Store(address, clock=clock)
    opened = await first.open()
    assert opened.counts == dict.fromkeys(TaskState, 0)
    assert opened.group_heads == []
    if backend not in DURABLE:
        await first.close()
        return
    await insert(first, new(1, unique_key="k"), new(2, serial_group="g", queue="q"))
    await first.close()
    second = Store(address, clock=clock)
    opened = await second.open()
    await second.close()
    assert opened.counts[TaskState.QUEUED] == 2
    if second.shared:  # the database decides keys and turns, not the server's memory
        assert (opened.unique_keys, opened.group_heads) == ({}, [])
    else:
        assert list(opened.unique_keys) == ["k"]
        assert [(g, s) for g, _, s in opened.group_heads] == [("g", TaskState.QUEUED)]
    assert sorted(opened.queues_with_work) == ["default", "q"]


CRASHER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from taskserver import EventType, TaskState
    from taskserver.lifecycle import start
    from taskserver.storage import NewTask, Store

    async def main():
        store = Store(sys.argv[1], node="crasher")
        await store.open()
        tasks, done = store.insert_tasks(
            [NewTask('1', 1, 2, None), NewTask('2', 2, 1, None), NewTask('3', 3, 2, None)]
        )
        await done
        if store.shared:  # claimed first: the claim counts each attempt
            claimed = asyncio.get_running_loop().create_future()
            store.page_queued("default", 3, [], claimed.set_result)
            tasks = await claimed
        for task in tasks[:2]:  # started and committed: left running
            start(task, 0.0)
            await store.update_task(task, EventType.STARTED)
        start(tasks[2], 0.0)  # started, never committed: only the backend's record knows
        store.update_task(tasks[2], EventType.STARTED)
        print(store.last_event_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("durable", DURABLE)
async def test_recovery_after_kill_9_counts_every_started_attempt(
    durable: str, tmp_path: Path, clock: Clock, request: pytest.FixtureRequest
) -> None:
    address = BACKENDS[durable](tmp_path, request)
    crash = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", CRASHER, address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    store = Store(address, clock=clock, node="crasher")  # the same server, restarted
    opened = await store.open()
    try:
        assert (opened.recovered_queued, opened.recovered_failed) == (2, 1)
        tasks = await store.list_tasks(state=None, after=0, limit=10)
        assert [(t.state, t.attempts) for t in tasks] == [
            (TaskState.QUEUED, 1),  # attempt 1 of 2 counted, back in the queue
            (TaskState.FAILED, 1),  # its only attempt killed the process
            (TaskState.QUEUED, 1),  # its start never committed, and counts anyway
        ]
        types = [e.type for e in await store.events_after(0, limit=100)][-3:]
        assert sorted(str(t) for t in types) == ["failed", "queued", "queued"]  # recovery's events
        assert opened.committed_event_id == store.last_event_id
    finally:
        await store.close()
