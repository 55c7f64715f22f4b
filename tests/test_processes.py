"""Process slots (``runtime/processes.py``) on real spawned processes, without a server.

Warm from the start, one process per slot reused call after call, calls and
answers of any size over the pipes, errors that cannot travel reported rather
than hung on, and a process that died while idle replaced without failing the
next call. Crashes, recycling and timeouts through a server are in
``test_jobs_processes.py``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from taskserver.runtime.context import ProcessTaskContext, run_in_process
from taskserver.runtime.processes import ProcessSlots, RemoteTraceback

from .conftest import ROOT, wait_for
from .jobs_helpers import cpu_echo, cpu_raise, process_alive


@pytest.fixture
async def slots() -> AsyncIterator[ProcessSlots]:
    pool = ProcessSlots(1)
    try:
        yield pool
    finally:
        pool.shutdown()


def _ctx(data: Any) -> ProcessTaskContext:
    return ProcessTaskContext(1, data, 1, 0)


async def test_the_process_is_started_with_the_pool_and_reused(slots: ProcessSlots) -> None:
    process = slots._slots[0].process
    assert process is not None
    pid = process.pid
    assert pid is not None
    await wait_for(lambda: process_alive(pid), message="the warm process")
    pids = {(await slots.run(run_in_process, cpu_echo, _ctx({})))["pid"] for _ in range(20)}
    assert pids == {pid}


async def test_calls_and_answers_larger_than_a_pipe_travel(slots: ProcessSlots) -> None:
    blob = os.urandom(3 * 1024 * 1024).hex()  # 6 MB each way: many pipe buffers
    answer = await slots.run(run_in_process, cpu_echo, _ctx({"blob": blob}))
    assert answer["data"]["blob"] == blob


async def test_an_exception_keeps_its_type_and_the_traceback_in_the_process(
    slots: ProcessSlots,
) -> None:
    with pytest.raises(ValueError, match="bad value in the process") as caught:
        await slots.run(run_in_process, cpu_raise, _ctx({"raise": "value"}))
    assert isinstance(caught.value.__cause__, RemoteTraceback)
    assert "cpu_raise" in str(caught.value.__cause__)


@pytest.mark.parametrize("data", [{"raise": "two"}, {"lambda": True}])
async def test_what_cannot_travel_back_is_an_error_not_a_hang(
    slots: ProcessSlots, data: dict[str, Any]
) -> None:
    with pytest.raises(TypeError, match="could not send its answer back"):
        await slots.run(run_in_process, cpu_raise, _ctx(data))
    assert (await slots.run(run_in_process, cpu_echo, _ctx({"n": 1})))["data"] == {"n": 1}
    assert slots.crashed == 0


async def test_a_process_killed_while_idle_is_replaced_before_the_next_call(
    slots: ProcessSlots,
) -> None:
    first = (await slots.run(run_in_process, cpu_echo, _ctx({})))["pid"]
    os.kill(first, signal.SIGKILL)
    await wait_for(lambda: not process_alive(first), message="the process gone")
    second = (await slots.run(run_in_process, cpu_echo, _ctx({})))["pid"]
    assert second != first
    assert (slots.crashed, slots.recycled) == (0, 1)


EXIT_SCRIPT = """
import asyncio
from taskserver.runtime.processes import ProcessSlots

KEPT = []


async def main():
    KEPT.append(ProcessSlots(1))  # never shut down, still referenced at exit
    await asyncio.sleep(0.5)


if __name__ == "__main__":
    asyncio.run(main())
"""


async def test_a_pool_never_shut_down_does_not_hang_the_exit(tmp_path: Path) -> None:
    # multiprocessing joins its children at exit; they waited for their pipe to close.
    script = tmp_path / "never_shut_down.py"
    script.write_text(EXIT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), env=env)
    try:
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
