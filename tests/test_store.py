"""Durable before acknowledged: ``server.task()`` returns once the row is committed.

Checked with a second, plain ``sqlite3`` connection to the same file: what it
sees is what survives a crash.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import orjson
import pytest

from taskserver import NotSerializable, ServerClosed, ValidationError

from .conftest import ServerFactory


def committed_task(db: str, task_id: int) -> tuple[str, Any] | None:
    """``(state, data)`` of the committed row, read through a separate connection."""
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT state, data FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else (row[0], orjson.loads(row[1]))


def count_rows(db: str) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        tasks = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    return int(tasks), int(events)


async def test_task_returns_after_the_row_is_committed(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    task_id = await server.task({"to": "a@example.com"})
    # Straight after the return, without yielding to the loop: the commit already happened.
    assert committed_task(server.settings.db, task_id) == ("queued", {"to": "a@example.com"})


async def test_concurrent_tasks_are_each_committed_on_return(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    db = server.settings.db
    missing: list[int] = []

    async def enqueue(n: int) -> int:
        task_id = await server.task({"n": n})
        if committed_task(db, task_id) != ("queued", {"n": n}):
            missing.append(task_id)
        return task_id

    ids = await asyncio.gather(*(enqueue(n) for n in range(100)))
    assert missing == []
    assert len(set(ids)) == 100
    # Each caller's task has its own id, in the order the calls were made.
    assert ids == sorted(ids)


async def test_ids_increase(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    ids = [await server.task(n) for n in range(20)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 20
    later = await asyncio.gather(*(server.task(n) for n in range(20)))
    assert min(later) > max(ids)


async def test_ids_keep_increasing_after_a_restart(make_server: ServerFactory) -> None:
    first = await make_server(task_workers=0)
    before = [await first.task(n) for n in range(3)]
    await first.stop()
    second = await make_server(task_workers=0)
    after = await second.task("again")
    assert after > max(before)
    listed = await second.list_tasks()
    assert [t.id for t in listed] == [*before, after]


async def test_every_task_has_a_stored_queued_event(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    ids = await asyncio.gather(*(server.task(n) for n in range(10)))
    with sqlite3.connect(server.settings.db) as conn:
        rows = conn.execute("SELECT task_id, type FROM events ORDER BY id").fetchall()
    assert rows == [(task_id, "queued") for task_id in ids]


async def test_group_commit_batches_concurrent_writes(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    commits_before = server.stats()["commits"]
    await asyncio.gather(*(server.task(n) for n in range(200)))
    # 200 callers arriving together share a handful of transactions, not one each.
    assert server.stats()["commits"] - commits_before <= 10


class Opaque:
    """Not JSON."""


@pytest.mark.parametrize(
    "payload",
    [object(), Opaque(), {"when": {1, 2}}, [1, b"bytes"], {1j: "complex key"}, {"n": 2**70}],
    ids=["object", "instance", "set-inside", "bytes-inside", "complex-key", "huge-int"],
)
async def test_unserialisable_payload_raises_and_writes_nothing(
    make_server: ServerFactory, payload: Any
) -> None:
    server = await make_server(task_workers=0)
    with pytest.raises(NotSerializable) as caught:
        await server.task(payload)
    assert caught.value.field == "data"
    assert isinstance(caught.value, ValidationError)
    assert count_rows(server.settings.db) == (0, 0)
    stats = server.stats()
    assert stats["queued"] == 0
    assert stats["last_event_id"] == 0
    # The server is unharmed: the next task goes through.
    assert await server.task("fine") >= 1
    assert count_rows(server.settings.db) == (1, 1)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 2.0}, "max_attempts"),
    ],
)
async def test_bad_options_raise_and_write_nothing(
    make_server: ServerFactory, options: dict[str, Any], field: str
) -> None:
    server = await make_server(task_workers=0)
    with pytest.raises(ValidationError) as caught:
        await server.task("x", **options)
    assert caught.value.field == field
    assert count_rows(server.settings.db) == (0, 0)


async def test_task_options_are_stored(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0, default_max_attempts=4, default_timeout=9.0)
    plain = await server.get(await server.task("defaults"))
    assert (plain.max_attempts, plain.timeout) == (4, 9.0)
    given = await server.get(await server.task("given", timeout=1.5, max_attempts=2))
    assert (given.max_attempts, given.timeout) == (2, 1.5)


async def test_task_refused_when_not_started(make_server: ServerFactory) -> None:
    server = await make_server(task_workers=0)
    await server.stop()
    with pytest.raises(ServerClosed):
        await server.task("late")
