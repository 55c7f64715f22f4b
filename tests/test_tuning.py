"""The GIL switch interval while task threads run: the short one, Python's when two contend."""

from __future__ import annotations

import sys
import threading
from typing import Any

from taskserver import SyncTaskContext, TaskState

from .conftest import ServerFactory


async def test_two_task_threads_at_once_get_pythons_switch_interval_back(
    make_server: ServerFactory,
) -> None:
    # Two threads holding the GIL in turn at 0.1 ms pay a hand-over every 0.1 ms (2 workers
    # of a 19 ms spin ran 1.18x slower per task than 1); at Python's 5 ms, 1.01x.
    python_default = sys.getswitchinterval()
    both = threading.Barrier(2, timeout=10)
    seen: dict[str, float] = {}

    def task(ctx: SyncTaskContext) -> Any:
        if ctx.data == "alone":
            seen["alone"] = sys.getswitchinterval()
            return None
        both.wait()  # both threads are inside their callbacks
        seen[ctx.data] = sys.getswitchinterval()
        both.wait()  # neither leaves before the other has looked
        return None

    server = await make_server(task, task_workers=2, gil_switch_interval=0.0007)
    pair = [await server.task(name) for name in ("first", "second")]
    for task_id in pair:
        assert (await server.wait_terminal(task_id, timeout=15)).state is TaskState.SUCCEEDED
    alone = await server.task("alone")
    assert (await server.wait_terminal(alone, timeout=15)).state is TaskState.SUCCEEDED

    assert seen["first"] == seen["second"] == python_default
    assert seen["alone"] == 0.0007  # one thread: the loop's short interval again
    assert sys.getswitchinterval() == 0.0007
    await server.stop()
    assert sys.getswitchinterval() == python_default


async def test_with_the_tuning_off_task_threads_leave_the_interval_alone(
    make_server: ServerFactory,
) -> None:
    before = sys.getswitchinterval()
    both = threading.Barrier(2, timeout=10)
    seen: list[float] = []

    def task(ctx: SyncTaskContext) -> Any:
        both.wait()
        seen.append(sys.getswitchinterval())
        both.wait()
        return None

    server = await make_server(task, task_workers=2, gil_switch_interval=0)
    pair = [await server.task(n) for n in range(2)]
    for task_id in pair:
        assert (await server.wait_terminal(task_id, timeout=15)).state is TaskState.SUCCEEDED
    assert seen == [before, before]
    assert sys.getswitchinterval() == before
