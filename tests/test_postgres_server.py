"""The tests' private PostgreSQL (tests/pg_server.py): real server, real asyncpg connections."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg
import pytest

from .conftest import postgres_missing
from .pg_server import PostgresServer, find_bindir

Notification = tuple[str, str]


async def listen(connection: asyncpg.Connection, channel: str) -> asyncio.Queue[Notification]:
    """LISTEN on ``channel``; every notification lands in the returned queue."""
    queue: asyncio.Queue[Notification] = asyncio.Queue()

    def received(_conn: object, _pid: int, chan: str, payload: object) -> None:
        queue.put_nowait((chan, str(payload)))

    await connection.add_listener(channel, received)
    return queue


async def test_connects_with_asyncpg(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database_async()
    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            "SELECT current_database() AS db, current_user AS who, inet_server_port() AS port,"
            " current_setting('max_connections')::int AS max_connections,"
            " current_setting('fsync') AS fsync"
        )
        assert row is not None
        assert dict(row) == {
            "db": dsn.rsplit("/", 1)[1],
            "who": "postgres",
            "port": postgres.port,
            "max_connections": 200,
            "fsync": "on",
        }
        assert connection.get_server_version().major >= 13  # DROP DATABASE ... WITH (FORCE)
    finally:
        await connection.close()


async def test_wrong_password_is_refused(postgres: PostgresServer) -> None:
    """TCP logins are scram-sha-256, so bad-credential handling can be tested for real."""
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(postgres.dsn_for("postgres", password="wrong"))


async def test_listen_notify_round_trip(postgres: PostgresServer) -> None:
    dsn = await postgres.create_database_async()
    listener = await asyncpg.connect(dsn)
    notifier = await asyncpg.connect(dsn)
    try:
        queue = await listen(listener, "tasks")
        started = time.perf_counter()
        await notifier.execute("SELECT pg_notify('tasks', 'queued:42')")
        assert await asyncio.wait_for(queue.get(), 10) == ("tasks", "queued:42")
        latency_ms = (time.perf_counter() - started) * 1000
        # NOTIFY inside a transaction is delivered at commit, not before.
        async with notifier.transaction():
            await notifier.execute("NOTIFY tasks, 'in-transaction'")
            await asyncio.sleep(0)
            assert queue.empty()
        assert await asyncio.wait_for(queue.get(), 10) == ("tasks", "in-transaction")
        print(f"NOTIFY round trip {latency_ms:.2f} ms")
    finally:
        await listener.close()
        await notifier.close()


async def test_fresh_databases_are_independent(postgres: PostgresServer) -> None:
    """Tables and NOTIFY channels of one test's database are invisible from another's."""
    dsn_a = await postgres.create_database_async()
    dsn_b = postgres.create_database()
    assert dsn_a != dsn_b
    a = await asyncpg.connect(dsn_a)
    b = await asyncpg.connect(dsn_b)
    try:
        await a.execute("CREATE TABLE tasks (id bigint PRIMARY KEY); INSERT INTO tasks VALUES (1)")
        assert await a.fetchval("SELECT count(*) FROM tasks") == 1
        assert await b.fetchval("SELECT to_regclass('tasks')") is None
        queue_a = await listen(a, "events")
        queue_b = await listen(b, "events")
        await b.execute("NOTIFY events, 'from-b'")
        assert await asyncio.wait_for(queue_b.get(), 10) == ("events", "from-b")
        await a.execute("NOTIFY events, 'from-a'")
        # All databases share one notification queue in commit order: had b's crossed
        # over, it would arrive at a before a's own.
        assert await asyncio.wait_for(queue_a.get(), 10) == ("events", "from-a")
        assert queue_a.empty()
    finally:
        await a.close()
        await b.close()


async def test_server_survives_a_killed_connection(postgres: PostgresServer) -> None:
    """A backend terminated server-side, or a client socket dropped, harms nobody else."""
    dsn = await postgres.create_database_async()
    bystander = await asyncpg.connect(dsn)
    victim = await asyncpg.connect(dsn)
    dropped = await asyncpg.connect(dsn)
    try:
        victim_pid = victim.get_server_pid()
        assert await bystander.fetchval("SELECT pg_terminate_backend($1, 5000)", victim_pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await victim.fetchval("SELECT 1")
        dropped.terminate()  # the client side: the socket closes mid-session
        # No crash restart: that would have closed the bystander's session too (as a
        # backend's kill -9 does: 'all server processes terminated; reinitializing').
        assert postgres.proc.poll() is None
        assert await bystander.fetchval("SELECT pg_backend_pid()") == bystander.get_server_pid()
        again = await asyncpg.connect(dsn)
        try:
            assert await again.fetchval("SELECT 1") == 1
        finally:
            await again.close()
    finally:
        await bystander.close()
        victim.terminate()


def test_sync_fixture_database(postgres: PostgresServer, postgres_db: str) -> None:
    """``postgres_db`` (for sync tests, e.g. ``taskserver run`` subprocesses) is fresh."""
    name = postgres_db.rsplit("/", 1)[1]
    assert name in postgres.created
    found = postgres.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'")
    assert found.strip() == "1"


def test_binaries_found_or_skip_only_outside_ci(tmp_path: Path) -> None:
    """No binaries anywhere: skip without CI, fail with it (CI must never skip these)."""
    assert find_bindir(pg_config=None, lib_glob=str(tmp_path / "*"), path=str(tmp_path)) is None
    with pytest.raises(pytest.skip.Exception):
        postgres_missing(ci=False)
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        postgres_missing(ci=True)
