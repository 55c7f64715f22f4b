"""The SQLite writer's thread (``storage/sqlite/writer.py``): calls run in order, off the
loop, and their results and exceptions reach the caller; ``close`` finishes what it got."""

from __future__ import annotations

import asyncio
import threading

import pytest

from taskserver.storage.sqlite.writer import WriterThread


async def test_calls_run_in_order_on_one_other_thread() -> None:
    writer = WriterThread("test-writer")
    seen: list[tuple[int, str]] = []

    def record(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 2

    try:
        results = await asyncio.gather(*(writer.run(record, i) for i in range(50)))
    finally:
        writer.close()
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-writer"}
    assert threading.current_thread().name != "test-writer"


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    writer = WriterThread("test-writer")

    def fail() -> None:
        raise ValueError("disk says no")

    try:
        with pytest.raises(ValueError, match="disk says no"):
            await writer.run(fail)
        assert await writer.run(lambda: 42) == 42
    finally:
        writer.close()


async def test_close_runs_what_was_handed_over_first() -> None:
    writer = WriterThread("test-writer")
    gate = threading.Event()
    done: list[int] = []
    first = writer.run(gate.wait, 10)
    later = [writer.run(done.append, i) for i in range(3)]
    gate.set()
    writer.close()  # blocks until the calls before it ran
    assert done == [0, 1, 2]
    assert repr(writer) == "<WriterThread test-writer stopped>"
    await asyncio.gather(first, *later)  # their answers still arrive on the loop


async def test_a_cancelled_caller_leaves_the_thread_working() -> None:
    writer = WriterThread("test-writer")
    gate = threading.Event()
    try:
        blocked = writer.run(gate.wait, 10)
        blocked.cancel()
        gate.set()
        assert await writer.run(lambda: "next") == "next"
    finally:
        writer.close()
