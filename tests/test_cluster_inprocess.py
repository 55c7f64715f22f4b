"""Several TaskServers on one PostgreSQL database, in one process: the cluster's rules.

Each server is a node of its own (its own connections, claims, lease and node
name), exactly as separate processes would be; tests/test_cluster.py runs real
``taskserver run`` processes and kills them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import asyncpg
import jwt
import pytest
from aiohttp import web

from taskserver import (
    EventType,
    Settings,
    TaskContext,
    TaskServer,
    TaskSpec,
    TaskState,
    attach,
    lifecycle,
)
from taskserver.models import Task
from taskserver.runtime import maintenance
from taskserver.storage import NewTask, Store
from taskserver.storage.postgres import schema as pg_schema

from .conftest import wait_for
from .pg_server import PostgresServer

Node = Callable[..., Awaitable[TaskServer]]


@pytest.fixture
async def node(postgres: PostgresServer) -> AsyncIterator[Node]:
    """Start nodes on one fresh database; ``node(name, task=fn, workers=2, **settings)``."""
    dsn = await postgres.create_database_async()
    started: list[TaskServer] = []

    async def start(
        name: str,
        task: Callable[[TaskContext], Any],
        *,
        workers: int = 2,
        setup: Callable[[TaskServer], None] | None = None,
        clock: Callable[[], float] = time.time,
        **overrides: Any,
    ) -> TaskServer:
        settings = Settings(
            db=dsn, node_name=name, task_workers=workers, port=0, grace_period=2.0, **overrides
        )
        server = TaskServer(settings, clock=clock)
        server.on("task", task)
        server.on("finish", lambda ctx, result: None)
        if setup is not None:
            setup(server)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        await server.stop()


async def test_tasks_enqueued_on_every_node_run_once_each(node: Node) -> None:
    runs: list[tuple[str, int, int]] = []

    def recorder(name: str) -> Callable[[TaskContext], Any]:
        async def task(ctx: TaskContext) -> Any:
            runs.append((name, ctx.id, ctx.attempt))
            await asyncio.sleep(0)
            return ctx.data

        return task

    a = await node("a", recorder("a"))
    b = await node("b", recorder("b"))
    c = await node("c", recorder("c"))
    ids = [await server.task(i) for i in range(100) for server in (a, b, c)]
    assert len(set(ids)) == 300  # ids are unique over the cluster
    await wait_for(lambda: len(runs) >= 300, timeout=30)
    for task_id in ids:
        done = await b.wait_terminal(task_id, timeout=10)
        assert done.state is TaskState.SUCCEEDED
    assert Counter((i, n) for _, i, n in runs) == Counter((i, 1) for i in ids)
    assert len({name for name, _, _ in runs}) >= 2  # the work was shared


async def test_a_node_waits_for_and_sees_the_events_of_a_task_run_elsewhere(node: Node) -> None:
    release = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await release.wait()
        return {"ran": ctx.data}

    a = await node("a", task)
    b = await node("b", task, workers=0)  # serves only: every task runs on a
    subscription = b.subscribe()
    task_id = await b.task("x")
    release.set()
    done = await b.wait_terminal(task_id, timeout=10)
    assert (done.state, done.result) == (TaskState.SUCCEEDED, {"ran": "x"})
    seen: list[str | None] = []
    while not seen or seen[-1] != "finished":
        event = await asyncio.wait_for(subscription.get(), 5)
        assert event is not None
        if event.task_id == task_id:
            seen.append(event.type)
    assert seen == ["queued", "started", "finished"]
    assert (await a.get(task_id)).state is TaskState.SUCCEEDED
    # An update published to the Mercure hub on one node reaches the other's subscribers.
    published, committed = a.publish_update(("https://example.com/books/1",), "new edition")
    await committed
    while True:
        event = await asyncio.wait_for(subscription.get(), 5)
        assert event is not None
        if event.task_id is None:
            break
    subscription.close()
    assert (event.topics, event.json, event.uid) == (published.topics, "new edition", None)
    assert event.id > max(e.id for e in await b.events_after(0) if e.task_id == task_id)


async def two_held_nodes(node: Node) -> tuple[TaskServer, TaskServer, asyncio.Event]:
    """Nodes a and b whose tasks run until the event returned is set."""
    release = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await release.wait()

    return await node("a", task), await node("b", task), release


async def test_a_unique_key_is_held_once_across_nodes(node: Node) -> None:
    a, b, release = await two_held_nodes(node)
    first = await a.submit(1, unique_key="k")
    second = await b.submit(2, unique_key="k")
    assert (second.id, second.existing) == (first.id, True)
    # /metrics counts what each node enqueued: b's task was kept out.
    assert (sum(a.tally.enqueued.values()), sum(b.tally.enqueued.values())) == (1, 0)
    release.set()
    await a.wait_terminal(first.id, timeout=10)
    third = await b.submit(3, unique_key="k")
    assert not third.existing
    assert third.id != first.id


async def test_unique_for_holds_while_the_holder_succeeds_on_another_node(node: Node) -> None:
    # Node b looks for a recent success of "k" (none: the holder still runs), then
    # inserts; the holder's success commits in between. The new task must not run.
    a, b, release = await two_held_nodes(node)
    holder = await a.submit(1, unique_key="k")

    async def running() -> bool:
        return (await a.get(holder.id)).state is TaskState.RUNNING

    await wait_for(running, message="the holder to run")
    dsn = a.settings.db
    finisher = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    try:
        # The holder's success, committing: its row is locked until we commit.
        success = finisher.transaction()
        await success.start()
        await finisher.execute(
            "UPDATE taskserver_tasks SET state = 'succeeded', finished_at = $2 WHERE id = $1",
            holder.id,
            time.time(),
        )
        # Twice in one call: the repeat must not name the task kept out either.
        second = asyncio.ensure_future(b.task_many([2, 3], unique_key="k", unique_for=60))

        async def insert_waits() -> bool:
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'INSERT INTO taskserver_tasks%'"
            )
            return bool(waiting)

        await wait_for(insert_waits, message="b's insert to wait for the holder's row")
        await success.commit()
        answers = await second
    finally:
        await finisher.close()
        await watcher.close()
        release.set()
    assert [(a.id, a.existing) for a in answers] == [(holder.id, True)] * 2
    rows = await b.list_tasks()
    assert [t.id for t in rows] == [holder.id]


async def test_a_holder_ending_between_insert_and_look_up_frees_its_key(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Node b's insert finds "k" held, and the holder's success commits before b looks
    # the holder up (made certain here: it commits as b's look-up is sent). The key is
    # free then: b's task is new, and the bulk call holds all or nothing.
    a, b, release = await two_held_nodes(node)
    holder = await a.submit(1, unique_key="k")

    async def running() -> bool:
        return (await a.get(holder.id)).state is TaskState.RUNNING

    await wait_for(running, message="the holder to run")
    finisher = await asyncpg.connect(a.settings.db)
    fetch = asyncpg.connection.Connection.fetch
    ended: list[str] = []

    async def holder_ends_first(self: asyncpg.Connection, query: str, *args: Any) -> Any:
        if query == pg_schema.SELECT_KEY_HOLDERS and not ended:
            ended.append(
                await finisher.execute(
                    "UPDATE taskserver_tasks SET state = 'succeeded', finished_at = $2"
                    " WHERE id = $1",
                    holder.id,
                    time.time(),
                )
            )
        return await fetch(self, query, *args)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetch", holder_ends_first)
    try:
        answers = await b.task_many([TaskSpec(2, {"unique_key": "k"}), TaskSpec(3)])
    finally:
        monkeypatch.undo()
        await finisher.close()
        release.set()
    assert ended == ["UPDATE 1"]
    assert [answer.existing for answer in answers] == [False, False]
    rows = {t.id: t for t in await b.list_tasks()}
    assert sorted(rows) == sorted([holder.id, *(answer.id for answer in answers)])
    assert rows[answers[0].id].unique_key == "k"


async def test_serial_groups_and_queue_concurrency_hold_across_nodes(node: Node) -> None:
    spans: dict[str, list[tuple[float, float, int]]] = {"g": [], "limited": []}
    loop = asyncio.get_running_loop()

    async def task(ctx: TaskContext) -> Any:
        start = loop.time()
        await asyncio.sleep(0.01)
        spans[ctx.data["kind"]].append((start, loop.time(), ctx.id))

    def limited(server: TaskServer) -> None:
        server.queue("limited", concurrency=2)

    nodes = [await node(name, task, workers=3, setup=limited) for name in "abc"]
    group_ids = []
    for i in range(12):
        server = nodes[i % 3]
        group_ids.append(await server.task({"kind": "g"}, serial_group="g"))
        await server.task({"kind": "limited"}, queue="limited")
    await wait_for(lambda: len(spans["g"]) == 12 and len(spans["limited"]) == 12, timeout=30)
    group = sorted(spans["g"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(group))  # one at a time
    assert [i for _, _, i in group] == group_ids  # in enqueue order
    edges = sorted(
        [(s, 1) for s, _, _ in spans["limited"]] + [(e, -1) for _, e, _ in spans["limited"]]
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak <= 2


async def test_a_task_running_on_another_node_is_cancelled(node: Node) -> None:
    started = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        started.set()
        await asyncio.sleep(60)

    a = await node("a", task)
    b = await node("b", task, workers=0)
    task_id = await b.task("long")
    await asyncio.wait_for(started.wait(), 10)
    cancelled = await b.cancel(task_id)
    assert cancelled.state is TaskState.CANCELLED
    assert (await a.get(task_id)).state is TaskState.CANCELLED


async def test_delays_and_retries_run_once_on_some_node(node: Node) -> None:
    attempts: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first time fails")
        return "ok"

    a = await node("a", task, retry_base=0.1, retry_jitter=0.0)
    b = await node("b", task, retry_base=0.1, retry_jitter=0.0)
    task_id = await a.task("x", delay=0.2, max_attempts=2)
    done = await b.wait_terminal(task_id, timeout=15)
    assert (done.state, done.attempts, attempts) == (TaskState.SUCCEEDED, 2, [1, 2])


async def test_stats_cover_the_cluster(node: Node) -> None:
    gate = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        await gate.wait()

    a = await node("a", task, workers=1)
    b = await node("b", task, workers=1)
    for _ in range(5):
        await a.task(None)
    await wait_for(lambda: {n["id"] for n in b.stats()["nodes"]} == {"a", "b"}, timeout=10)
    await wait_for(lambda: b.stats()["tasks"]["running"] == 2, timeout=10)
    assert b.stats()["tasks"]["queued"] == 3
    gate.set()


async def test_a_node_without_a_lease_loses_its_running_tasks_to_the_others(
    node: Node, postgres: PostgresServer
) -> None:
    ran: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        ran.append(ctx.attempt)
        return "rescued"

    a = await node("a", task, lease=3.0)
    dsn = a.settings.db
    # A node that claimed a task and then stopped renewing its lease (cut off, hung):
    # its connections stay open, so only the lease can tell.
    ghost = Store(dsn, node="ghost")
    await ghost.open()
    try:
        (stuck,), committed = ghost.insert_tasks([NewTask("1", 1, 3, None, queue="ghostly")])
        # Claimed in the insert's own transaction: a would claim it first otherwise.
        claimed: asyncio.Future[list[Task]] = asyncio.get_running_loop().create_future()
        ghost.page_queued("ghostly", 1, [], claimed.set_result)
        await committed
        (mine,) = await claimed
        conn = await asyncpg.connect(dsn)
        await conn.execute(
            "UPDATE taskserver_nodes SET heartbeat = heartbeat - 100 WHERE id = 'ghost'"
        )
        await conn.close()
        done = await a.wait_terminal(stuck.id, timeout=20)
        assert (done.state, done.attempts, done.result) == (TaskState.SUCCEEDED, 2, "rescued")
        assert ran == [2]  # the ghost's attempt counted
        # The ghost wakes up and reports its outcome: the row is not its own any more.
        lifecycle.start(mine, 0.0)
        lifecycle.end(mine, lifecycle.FAILED, 0.0)
        await ghost.update_task(mine, EventType.FAILED)
        assert (await a.get(stuck.id)).state is TaskState.SUCCEEDED
    finally:
        await ghost.close()


async def test_a_cron_due_time_is_enqueued_once_by_the_cluster(node: Node) -> None:
    # Every node's clock is 3 s before a minute starts: all three start, then wake for it.
    offset = math.floor(time.time() / 60 + 1) * 60 - 3.0 - time.time()
    ran: list[int] = []
    attempts: list[str] = []

    async def task(ctx: TaskContext) -> Any:
        ran.append(ctx.id)

    def every_minute(server: TaskServer) -> None:
        server.schedule("tick", "* * * * *", "tock")
        run = server._maintenance._enqueue_run  # observed, to know every node has tried

        async def observed(*args: Any) -> None:
            await run(*args)
            attempts.append(server.settings.node_name or "")

        server._maintenance._enqueue_run = observed  # type: ignore[method-assign,assignment]

    nodes = [
        await node(name, task, setup=every_minute, clock=lambda: time.time() + offset)
        for name in "abc"
    ]
    await wait_for(lambda: len(attempts) == 3, timeout=15)
    assert sorted(attempts) == ["a", "b", "c"]  # every node enqueued the due time...
    stored = await nodes[0].store.list_tasks(state=None, after=0, limit=10)
    assert [t.name for t in stored] == ["tick"]  # ...and the cluster stored it once
    await wait_for(lambda: ran, timeout=10)
    assert ran == [stored[0].id]


async def test_dead_letters_retried_and_purged_from_any_node(node: Node) -> None:
    outcomes: dict[int, int] = {}

    async def flaky(ctx: TaskContext) -> Any:
        outcomes[ctx.id] = outcomes.get(ctx.id, 0) + 1
        if outcomes[ctx.id] == 1:
            raise RuntimeError("dead letter")
        return "ok"

    a = await node("a", flaky)
    b = await node("b", flaky)
    ids = [await a.task(i) for i in range(10)]
    for task_id in ids:
        assert (await b.wait_terminal(task_id, timeout=10)).state is TaskState.FAILED
    assert sorted(await b.retry_failed()) == ids  # retried from the other node
    for task_id in ids:
        assert (await a.wait_terminal(task_id, timeout=10)).state is TaskState.SUCCEEDED
    # Both nodes purge at once: each task is deleted once, none is left.
    purged = await asyncio.gather(a.purge(0), b.purge(0))
    assert sum(purged) == 10
    assert await a.store.list_tasks(state=None, after=0, limit=100) == []


async def test_long_tasks_are_not_claimed_ahead_of_a_busy_node(node: Node) -> None:
    ran: list[str] = []

    def runs_on(name: str) -> Callable[[TaskContext], Any]:
        async def task(ctx: TaskContext) -> Any:
            ran.append(name)
            await asyncio.sleep(0.2)  # long: past SHORT_TASK, so nothing is claimed ahead

        return task

    a = await node("a", runs_on("a"), workers=1)
    ids = [await a.task(i) for i in range(6)]
    await wait_for(lambda: ran, timeout=10)
    b = await node("b", runs_on("b"), workers=1)  # comes late: a must not hold the rest
    for task_id in ids:
        await b.wait_terminal(task_id, timeout=20)
    assert ran.count("b") >= 2
    assert a.stats()["ready"] == 0


async def test_a_queue_paused_on_one_node_starts_nothing_anywhere(node: Node) -> None:
    ran: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        ran.append(ctx.id)

    a = await node("a", task)
    b = await node("b", task)
    await a.pause_queue("mail")
    await wait_for(lambda: "mail" in b.stats()["queues"] and b.stats()["queues"]["mail"]["paused"])
    ids = [await server.task(i, queue="mail") for i in range(4) for server in (a, b)]
    # Work enqueued after them in another queue runs on both nodes; the paused ones do not.
    others = [await server.task("other") for server in (a, b, a, b)]
    for task_id in others:
        await a.wait_terminal(task_id, timeout=10)
    assert sorted(ran) == sorted(others)
    assert {(await b.get(i)).state for i in ids} == {TaskState.QUEUED}
    await b.resume_queue("mail")  # resumed elsewhere: every node starts them again
    for task_id in ids:
        assert (await a.wait_terminal(task_id, timeout=10)).state is TaskState.SUCCEEDED
    assert sorted(ran) == sorted(others + ids)


async def test_a_freed_slot_of_a_limited_queue_is_taken_at_once(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The safety net 10 s apart, not 1 s: a slot taken within 3 s was taken at once, even
    # on a slow machine, and one the net found would take 10 s.
    monkeypatch.setattr(maintenance, "CLUSTER_INTERVAL", 10.0)
    spans: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()

    async def task(ctx: TaskContext) -> Any:
        start = loop.time()
        await asyncio.sleep(0.1)
        spans.append((start, loop.time()))

    def limited(server: TaskServer) -> None:
        server.queue("limited", concurrency=2)

    a = await node("a", task, workers=3, setup=limited)
    await node("b", task, workers=3, setup=limited)
    await a.task_many(list(range(8)), queue="limited")  # one commit: one notification
    await wait_for(lambda: len(spans) == 8, timeout=30)
    spans.sort()
    # Task k + 2 waits for a slot: k's or k + 1's. Not for the once-a-second safety net.
    waits = [later[0] - min(e for _, e in spans[k : k + 2]) for k, later in enumerate(spans[2:])]
    assert max(waits) < 3, waits


async def test_the_subscriptions_api_lists_every_nodes_subscribers(
    postgres: PostgresServer, aiohttp_client: Any
) -> None:
    dsn = await postgres.create_database_async()
    key = "!ChangeThisMercureHubJWTSecretKey!"
    clients = []
    for name in ("a", "b"):
        server = TaskServer(
            Settings(db=dsn, node_name=name, task_workers=0, port=0, mercure_publisher_jwt_key=key)
        )
        app = web.Application()
        attach(app, server)
        clients.append(await aiohttp_client(app))
    a, b = clients
    api = "/.well-known/mercure/subscriptions"
    reader = {"Authorization": "Bearer " + _token(key, ["*"])}
    book = "https://example.com/books/1"
    alice = {"user": "alice", "n": 2**70}  # past 64 bits: as it came
    subscriber = {"Authorization": "Bearer " + _token(key, [book], payload=alice)}

    async def listed(client: Any, path: str = api) -> list[dict[str, Any]]:
        response = await client.get(path, headers=reader)
        body = await response.json()
        assert "subscriptions" in body, (response.status, body)
        return list(body["subscriptions"])

    async with a.get("/.well-known/mercure", params={"topic": book}, headers=subscriber):
        # On b once a has written it (b's own would be listed at once).
        docs = await wait_for(lambda: listed(b), message="b to list a's subscriber")
        assert [(d["topic"], d["payload"]) for d in docs] == [(book, alice)]
        assert await listed(a) == docs
        assert await listed(b, f"{api}/{quote(book, safe='')}") == docs
        assert await listed(b, f"{api}/{quote('https://example.com/other', safe='')}") == []
        single = await b.get(docs[0]["id"], headers=reader)
        assert single.status == 200
        assert (await single.json())["subscriber"] == docs[0]["subscriber"]

    async def gone() -> bool:
        return not await listed(b)

    await wait_for(gone, message="b to see a's subscriber leave")
    assert (await b.get(docs[0]["id"], headers=reader)).status == 404


def _token(key: str, subscribe: list[str], payload: Any = None) -> str:
    mercure: dict[str, Any] = {"subscribe": subscribe}
    if payload is not None:
        mercure["payload"] = payload
    return jwt.encode({"mercure": mercure}, key, algorithm="HS256")


async def test_a_commit_notifies_of_its_events_only_the_nodes_that_follow_them(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from taskserver.storage.postgres import backend as pg_backend
    from taskserver.storage.postgres.writes import EVENTS_CHANNEL

    async def task(ctx: TaskContext) -> Any:
        return ctx.data

    a = await node("a", task)
    b = await node("b", task, workers=0)  # serves only: every task runs on a
    told: list[str] = []
    listener = await asyncpg.connect(a.settings.db)
    await listener.add_listener(EVENTS_CHANNEL, lambda *args: told.append(str(args[3])))

    async def run_on_a(data: str) -> int:
        task_id = await a.task(data)  # committed when it returns
        state = await wait_for(lambda: _ended(a, task_id), message=f"task {data} ended on a")
        assert state is TaskState.SUCCEEDED
        return task_id

    try:
        # Nobody follows: only the commit that made work (its queue named) notifies.
        await run_on_a("quiet")
        await wait_for(lambda: told, message="the enqueue's notification")
        assert all(" " in payload for payload in told), told  # each one names a queue
        last = max(e.id for e in await a.events_after(0))
        assert b.committed_event_id < last  # b was not told of the run's last events

        # b follows before its subscriber listens: it starts from the cluster's last event
        # (a live stream gets nothing older) and is told of every commit from now on.
        await b.follow_events()
        assert b.committed_event_id == last
        subscription = b.subscribe()
        told.clear()
        followed = await run_on_a("followed")
        seen: list[str | None] = []
        while not seen or seen[-1] != "finished":
            event = await asyncio.wait_for(subscription.get(), 5)
            assert event is not None
            assert event.task_id == followed  # nothing older: it started at the last event
            seen.append(event.type)
        assert seen == ["queued", "started", "finished"]
        await wait_for(
            lambda: any(" " not in payload for payload in told),
            message="a notification of a commit with events only",
        )

        # Nobody has listened on b for the grace: it stops following.
        subscription.close()
        monkeypatch.setattr(pg_backend, "FOLLOW_GRACE", 0.0)
        await b.store.unfollow_idle()
        await asyncio.sleep(0)
        told.clear()
        await run_on_a("quiet again")
        await wait_for(lambda: told, message="the enqueue's notification")
        assert all(" " in payload for payload in told), told
    finally:
        await listener.close()


async def _ended(server: TaskServer, task_id: int) -> TaskState | None:
    state = (await server.get(task_id)).state
    return state if state in lifecycle.TERMINAL else None


async def test_a_node_given_up_for_dead_follows_the_events_again_when_it_comes_back(
    node: Node,
) -> None:
    async def task(ctx: TaskContext) -> Any:
        return None

    await node("a", task, lease=3.0)
    b = await node("b", task, workers=0, lease=3.0)
    await b.follow_events()
    subscription = b.subscribe()  # someone listens on b
    conn = await asyncpg.connect(b.settings.db)

    async def followers() -> list[str]:
        return list(await conn.fetchval("SELECT followers FROM taskserver_event_counter"))

    try:
        assert await followers() == ["b"]
        # What a node that rescues b does once b's lease has run out (b hung, say).
        await conn.execute("DELETE FROM taskserver_nodes WHERE id = 'b'")
        await conn.execute(
            "UPDATE taskserver_event_counter SET followers = array_remove(followers, 'b')"
        )

        async def back() -> bool:
            return await followers() == ["b"]

        # b's next lease renewal finds its row gone and writes it again: it follows again.
        await wait_for(back, timeout=10, message="b to follow the events again")
    finally:
        subscription.close()
        await conn.close()
