"""The PostgreSQL backend's own promises: gap-safe event ids while several servers commit
at once, migrations racing, a newer schema refused, bad addresses, a database that
goes away and comes back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

from taskserver import EventType, Settings, TaskServer, TaskState, lifecycle
from taskserver.errors import ConfigError, ServerBusy
from taskserver.models import Task
from taskserver.storage import NewTask, Store
from taskserver.storage.postgres import schema

from .conftest import wait_for
from .pg_server import PostgresServer, free_port


async def test_readers_see_event_ids_in_order_with_no_hole_while_nodes_commit_at_once(
    postgres: PostgresServer,
) -> None:
    dsn = await postgres.create_database_async()
    nodes = [Store(dsn, node=f"n{i}") for i in range(3)]
    for store in nodes:
        await store.open()
    done = asyncio.Event()
    seen: list[int] = []

    async def follow(reader: Store) -> None:
        # What Last-Event-ID replay does: ask for what follows the last id seen.
        while True:
            finished = done.is_set()
            for event in await reader.events_after(seen[-1] if seen else 0, limit=500):
                seen.append(event.id)
            if finished:
                return

    async def publish(store: Store, name: str) -> None:
        for i in range(150):
            commits = [store.publish_update((f"urn:{name}",), str(i))[1] for _ in range(3)]
            await asyncio.gather(*commits)

    follower = asyncio.create_task(follow(nodes[0]))
    await asyncio.gather(*(publish(store, f"n{i}") for i, store in enumerate(nodes)))
    done.set()
    await follower
    everything = [e.id for e in await nodes[1].events_after(0, limit=10_000)]
    for store in nodes:
        await store.close()
    assert len(everything) == 3 * 150 * 3
    assert everything == list(range(1, len(everything) + 1))  # dense: no id lost
    assert seen == everything  # followed live: nothing missed, nothing twice


async def test_servers_starting_at_once_migrate_once(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database_async()
    stores = [Store(dsn, node=f"m{i}") for i in range(4)]
    await asyncio.gather(*(store.open() for store in stores))
    for store in stores:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(schema.SELECT_VERSION) == len(schema.MIGRATIONS)
    finally:
        await conn.close()


async def test_a_database_of_a_newer_schema_is_refused(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database_async()
    store = Store(dsn)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(dsn)
    await conn.execute("UPDATE taskserver_schema SET version = 99")
    await conn.close()
    with pytest.raises(ConfigError, match="schema version 99, newer than this taskserver"):
        await Store(dsn).open()


async def test_two_live_servers_cannot_share_a_node_name(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database_async()
    first = Store(dsn, node="same")
    await first.open()
    try:
        with pytest.raises(ConfigError, match="another taskserver is running as node 'same'"):
            await Store(dsn, node="same").open()
    finally:
        await first.close()


def _run(db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskserver", "run", "--db", db, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("password", "refused the password"),
        ("database", "database 'no_such_db' does not exist"),
        ("port", "cannot reach PostgreSQL at"),
    ],
)
def test_bad_database_addresses_exit_2_with_one_line(
    postgres: PostgresServer, case: str, expected: str
) -> None:
    if case == "password":
        db = postgres.dsn_for("postgres", password="wrong")
    elif case == "database":
        db = postgres.dsn_for("no_such_db")
    else:
        db = f"postgresql://{postgres.user}:x@127.0.0.1:{free_port()}/postgres"
    result = _run(db)
    assert result.returncode == 2, result.stderr
    # Log lines of the start may come before it; the error is one line, the last.
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("taskserver: error: ")
    assert expected in lines[0]
    assert result.stderr.rstrip().endswith(lines[0])
    assert postgres.password not in result.stderr
    if case == "password":
        assert "wrong" not in result.stderr  # not even the wrong password is echoed


async def _cut_off(dsn: str, postgres: PostgresServer, *, allow: bool) -> None:
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(postgres.dsn)
    try:
        await conn.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allow).lower()}")
        if not allow:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            # pg_terminate_backend only signals: until a session has ended, it still
            # answers (a read on it rightly succeeds), so the cut is done when none is left.
            await wait_for(
                lambda: _sessions_gone(conn, name), timeout=20, message=f"{name}'s sessions to end"
            )
    finally:
        await conn.close()


async def _sessions_gone(conn: asyncpg.Connection, name: str) -> bool:
    left = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name)
    return bool(left == 0)


async def test_a_database_that_goes_away_refuses_tasks_then_recovers(
    postgres: PostgresServer,
) -> None:
    dsn = await postgres.create_database_async()
    ran: list[Any] = []

    async def task(ctx: Any) -> Any:
        ran.append(ctx.data)

    server = TaskServer(Settings(db=dsn, node_name="away", task_workers=1, port=0))
    server.on("task", task)
    server.on("finish", lambda ctx, result: None)
    await server.start()
    try:
        before = await server.task("before")
        await server.wait_terminal(before, timeout=10)
        await _cut_off(dsn, postgres, allow=False)
        refused = await wait_for(lambda: _refused(server), timeout=20)
        assert "database" in str(refused) or "PostgreSQL" in str(refused)
        with pytest.raises(ServerBusy, match="the database cannot be read now"):
            await server.get(before)  # reads say 503 too, not 500
        await _cut_off(dsn, postgres, allow=True)
        after = await wait_for(lambda: _try_task(server), timeout=20)
        done = await server.wait_terminal(after, timeout=10)
        assert done.state is TaskState.SUCCEEDED
        assert "after" in ran
    finally:
        await server.stop()


async def _refused(server: TaskServer) -> ServerBusy | None:
    try:
        await server.task("while away")  # one may still be on its way when the cut lands
    except ServerBusy as exc:
        return exc
    return None


async def _try_task(server: TaskServer) -> int | None:
    try:
        return await server.task("after")
    except ServerBusy:
        return None


async def test_shared_counts_match_the_rows_after_a_mixed_workload(
    postgres: PostgresServer,
) -> None:
    dsn = await postgres.create_database_async()
    store = Store(dsn, node="counter")
    await store.open()
    try:
        items = [NewTask(str(i), i, 3, None, queue=f"q{i % 3}") for i in range(60)]
        tasks, committed = store.insert_tasks(items)
        await committed
        claimed: asyncio.Future[list[Task]] = asyncio.get_running_loop().create_future()
        store.page_queued("q0", 15, [], claimed.set_result)
        for i, task in enumerate(await claimed):
            lifecycle.start(task, 0.0)
            if i % 2:
                lifecycle.end(task, lifecycle.SUCCEEDED, 0.0)
            store.update_task(task, EventType.STARTED)
        assert await store.cancel_pending(tasks[1].id) is TaskState.QUEUED
        await store.lease("{}")  # folds the deltas so far into the totals
        assert await store.purge((TaskState.CANCELLED,), 10**10) == 1
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT queue, state, count(*) FROM taskserver_tasks GROUP BY queue, state"
            )
        finally:
            await conn.close()
        truth: dict[str, dict[TaskState, int]] = {}
        for queue, state, n in rows:
            truth.setdefault(queue, {})[TaskState(state)] = n
        active = {
            q: {s: n for s, n in c.items() if s in lifecycle.ACTIVE} for q, c in truth.items()
        }
        assert await store.count_by_queue() == {q: c for q, c in active.items() if c}
        by_state = dict.fromkeys(TaskState, 0)
        for counts in truth.values():
            for state, n in counts.items():
                by_state[state] += n
        assert await store.count_by_state() == by_state
        assert (by_state[TaskState.RUNNING], by_state[TaskState.SUCCEEDED]) == (8, 7)
    finally:
        await store.close()
