"""The attempts journal, from inside: what recovery counts, and that it stays bounded.

A *crash image* is what a ``kill -9`` would leave at one instant: the committed
database (SQLite's backup API reads it consistently while the server runs) and
the bytes of the journal file. Opening a store on it runs the real recovery.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import struct
from pathlib import Path

from taskserver import TaskContext, TaskServer, TaskState
from taskserver.models import EventType
from taskserver.storage import NewTask, Store
from taskserver.storage.sqlite.attempts import AttemptJournal

from .conftest import ServerFactory, wait_for


def crash_image(server: TaskServer, to: Path) -> str:
    """Copy what ``kill -9`` would leave of ``server``'s files now; returns the db path."""
    db = server.settings.db
    with sqlite3.connect(db) as source, sqlite3.connect(to) as target:
        source.backup(target)
    shutil.copyfile(f"{db}-attempts", f"{to}-attempts")
    return str(to)


async def recovered(db: str) -> dict[int, tuple[TaskState, int, str | None]]:
    """Open a store on ``db`` (recovery runs) and return ``id -> (state, attempts, error)``."""
    store = Store(db)
    await store.open()
    try:
        tasks = await store.list_tasks(state=None, after=0, limit=100)
        return {t.id: (t.state, t.attempts, t.error) for t in tasks}
    finally:
        await store.close()


async def test_a_start_that_never_committed_counts_at_the_next_open(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    images: dict[int, str] = {}

    async def task(ctx: TaskContext) -> None:
        # First thing, before its `started` row can have committed: "kill -9" here.
        images[ctx.id] = crash_image(server, tmp_path / f"image-{ctx.id}.db")

    server = await make_server(task, task_workers=1)
    again = await server.task({}, max_attempts=2)
    last = await server.task({}, max_attempts=1)
    for task_id in (again, last):
        await server.wait_terminal(task_id, timeout=10)

    assert (await recovered(images[again]))[again][:2] == (TaskState.QUEUED, 1)
    state, attempts, error = (await recovered(images[last]))[last]
    assert (state, attempts) == (TaskState.FAILED, 1)
    assert "died during attempt 1 of 1" in str(error)
    # The journal is emptied once folded in: a second open counts nothing more.
    assert (await recovered(images[again]))[again][:2] == (TaskState.QUEUED, 1)


async def test_a_start_that_committed_is_not_counted_again(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    gate = asyncio.Event()

    async def task(ctx: TaskContext) -> None:
        if ctx.data == "fail":
            raise RuntimeError("fails once")
        await gate.wait()

    server = await make_server(task, task_workers=1)
    failing = await server.task("fail", max_attempts=1)
    await server.wait_terminal(failing, timeout=10)
    busy = await server.task("block", max_attempts=2)
    await wait_for(lambda: server.is_running(busy), message="the worker busy")
    # Retried by hand: attempts back to 0, committed; the journal still holds its
    # first start, whose `started` event committed long ago.
    await server.retry(failing)
    image = crash_image(server, tmp_path / "image.db")
    gate.set()

    states = await recovered(image)
    assert states[failing][:2] == (TaskState.QUEUED, 0)
    assert states[busy][:2] == (TaskState.QUEUED, 1)  # it was running: its attempt counts


async def test_the_journal_stays_bounded_and_is_removed_on_close(tmp_path: Path) -> None:
    db = str(tmp_path / "bounded.db")
    store = Store(db, journal_segment=32)
    await store.open()
    assert store.journal is not None
    path = store.journal.path
    assert file_size(path) == 2 * 32 * 32
    item = NewTask(text="{}", data={}, max_attempts=1, timeout=None)
    for _ in range(10):
        tasks, committed = store.insert_tasks([item] * 20)
        await committed
        for task in tasks:
            task.state, task.attempts = TaskState.RUNNING, 1
            store.update_task(task, EventType.STARTED)
        for task in tasks:
            task.state = TaskState.SUCCEEDED
            await store.update_task(task, EventType.FINISHED)
    # 200 starts through two segments of 32: each freed once its batch committed.
    assert file_size(path) == 2 * 32 * 32
    assert store.journal.lost == 0
    await store.close()
    assert file_size(path) is None


def file_size(path: str) -> int | None:
    return os.path.getsize(path) if os.path.exists(path) else None


def test_the_journal_grows_rather_than_overwrite_starts_not_committed(tmp_path: Path) -> None:
    journal = AttemptJournal(str(tmp_path / "grow.db"), segment_records=4)
    assert journal.lock()
    journal.open()
    full = [journal.started(i, 1, 100 + i) for i in range(1, 14)]
    # Segments 0, 1 and 2 filled up; none was retired, so the file grew to four.
    assert [s for s in full if s is not None] == [0, 1, 2]
    assert os.path.getsize(journal.path) == 4 * 4 * 32
    assert sorted(journal.read()) == [(i, 1, 100 + i) for i in range(1, 14)]
    journal.retire(0)
    assert sorted(journal.read()) == [(i, 1, 100 + i) for i in range(5, 14)]
    journal.close()


def test_records_cut_short_or_damaged_count_for_nothing(tmp_path: Path) -> None:
    journal = AttemptJournal(str(tmp_path / "torn.db"))
    assert journal.lock()
    journal.open()
    journal.started(7, 2, 40)
    with open(journal.path, "rb") as file:
        valid = file.read(32)
    journal.close()
    with open(journal.path, "wb") as file:
        file.write(valid)
        file.write(valid[:16] + bytes(16))  # the process died while writing these
        file.write(bytes(16) + valid[16:])
        file.write(struct.pack("<QQQQ", 8, 1, 41, 12345))  # a bad check
        file.write(bytes(32))
        file.write(valid[:20])  # a file cut short
    assert journal.lock()
    assert list(journal.read()) == [(7, 2, 40)]
    journal.close()
    assert file_size(journal.path) is not None  # never opened for use: kept


async def test_a_second_store_on_the_same_file_leaves_the_journal_alone(tmp_path: Path) -> None:
    db = str(tmp_path / "shared.db")
    first = Store(db)
    await first.open()
    assert first.journal is not None
    tasks, committed = first.insert_tasks(
        [NewTask(text="{}", data={}, max_attempts=2, timeout=None)]
    )
    await committed
    tasks[0].state, tasks[0].attempts = TaskState.RUNNING, 1
    first.journal.started(tasks[0].id, 1, first.last_event_id + 1)  # a start in flight
    second = Store(db)
    await second.open()
    # It neither folded in the live start nor emptied the file under the first store.
    assert second.journal is None
    stored = await second.get_task(tasks[0].id)
    assert stored is not None
    assert (stored.state, stored.attempts) == (TaskState.QUEUED, 0)
    assert list(first.journal.read()) == [(tasks[0].id, 1, first.last_event_id + 1)]
    await second.close()
    assert file_size(first.journal.path) is not None
    await first.close()
    assert file_size(f"{db}-attempts") is None
