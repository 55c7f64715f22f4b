"""Durable before acknowledged: ``server.task()`` returns once the row is committed.

Checked with a second, plain ``sqlite3`` connection to the same file: what it
sees is what survives a crash.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import sys
from typing import Any

import orjson
import pytest

from taskserver import NotSerializable, ServerClosed, TaskContext, ValidationError
from taskserver.storage.engine import EARLY_HAND_OFF

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


async def test_a_batch_its_callers_filled_at_once_commits_while_the_workers_run(
    make_server: ServerFactory,
) -> None:
    # Producers that enqueue again as soon as their task is durable fill the next
    # batch in one loop iteration: it must go to the writer then, not wait until the
    # workers have run the tasks just committed (the two would take turns).
    committing: list[int] = []

    async def task(ctx: TaskContext) -> None:
        committing.append(server.store.committing)

    server = await make_server(task=task, task_workers=4)
    assert server.store is not None
    producers, rounds = 100, 5

    async def produce() -> list[int]:
        return [await server.task(n) for n in range(rounds)]

    ids = [i for ids in await asyncio.gather(*(produce() for _ in range(producers))) for i in ids]
    await server.wait(ids, timeout=10)
    assert len(committing) == producers * rounds
    # While the workers ran a batch's tasks, the next batch (an insert and an event
    # per producer) was already committing.
    assert max(committing) >= EARLY_HAND_OFF
    with sqlite3.connect(server.settings.db) as conn:
        states = conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
        types = conn.execute(
            "SELECT group_concat(type, ' ') FROM (SELECT task_id, type FROM events ORDER BY id)"
            " GROUP BY task_id"
        ).fetchall()
    assert states == [("succeeded", producers * rounds)]
    assert set(types) == {("queued started finished",)}


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


def stored_types(db: str, task_id: int) -> dict[str, str]:
    """SQLite's ``typeof`` of every column of the committed row."""
    with sqlite3.connect(db) as conn:
        names = [r[1] for r in conn.execute("PRAGMA table_info(tasks)")]
        row = conn.execute(
            f"SELECT {', '.join(f'typeof({n})' for n in names)} FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
    return dict(zip(names, row, strict=True))


async def test_missing_values_are_stored_as_null_and_given_ones_as_given(
    make_server: ServerFactory,
) -> None:
    # The writer binds no None (see schema.NO_TEXT): '' and NaN stand in for it and
    # must come out as NULL, while real values, '' results included, stay as they are.
    async def work(ctx: TaskContext) -> Any:
        await ctx.progress(0.5, "" if ctx.data == "plain" else "half")
        return None if ctx.data == "plain" else ""

    server = await make_server(work)
    db = server.settings.db
    plain = await server.task("plain")
    given = await server.task(
        "given", name="mail", serial_group="g", unique_key="k", timeout=30.0, max_attempts=2
    )
    await server.wait_terminal(plain, timeout=10)
    await server.wait_terminal(given, timeout=10)

    types = stored_types(db, plain)
    for column in (
        "name", "serial_group", "unique_key", "timeout", "retry", "message", "result",
        "error", "traceback", "finish_error", "hook_error",
    ):  # fmt: skip
        assert types[column] == "null", column
    assert types["progress"] == types["started_at"] == types["finished_at"] == "real"

    types = stored_types(db, given)
    assert types["name"] == types["serial_group"] == types["unique_key"] == "text"
    assert types["message"] == types["result"] == "text"
    assert types["timeout"] == "real"
    row = await server.get(given)
    assert (row.name, row.serial_group, row.unique_key) == ("mail", "g", "k")
    assert (row.message, row.result, row.timeout) == ("half", "", 30.0)
    assert (await server.get(plain)).message is None


async def test_the_gil_switch_interval_is_set_while_the_server_runs(
    make_server: ServerFactory,
) -> None:
    before = sys.getswitchinterval()
    server = await make_server(gil_switch_interval=0.0007)
    assert sys.getswitchinterval() == pytest.approx(0.0007)
    await server.stop()
    assert sys.getswitchinterval() == before
    untouched = await make_server(gil_switch_interval=0)
    assert sys.getswitchinterval() == before
    await untouched.stop()


async def test_the_gc_threshold_is_set_while_the_server_runs(make_server: ServerFactory) -> None:
    before = gc.get_threshold()
    server = await make_server(gc_threshold=12_345)
    assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_freeze_count() > 0  # what existed at start is out of the sweeps
    await server.stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    untouched = await make_server(gc_threshold=0)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    await untouched.stop()
