"""Progress reported after an attempt is over changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from taskserver import EventType, TaskContext

from .conftest import ServerFactory, wait_for


async def test_progress_from_a_leftover_coroutine_is_ignored(make_server: ServerFactory) -> None:
    late: asyncio.Event = asyncio.Event()
    reported: list[bool] = []

    async def task(ctx: TaskContext) -> Any:
        async def straggler() -> None:
            await late.wait()
            await ctx.progress(0.5, "too late")  # the attempt has ended by now
            reported.append(True)

        loose = asyncio.get_running_loop().create_task(straggler())
        keep.append(loose)
        return "done"

    keep: list[asyncio.Task[None]] = []
    server = await make_server(task=task)
    task_id = await server.task(None)
    finished = await server.wait_terminal(task_id, timeout=10)
    late.set()
    await wait_for(lambda: reported, message="the late progress call returned")
    await asyncio.gather(*keep)
    events = await server.events_after(0, task_id=task_id)
    assert [e.type for e in events] == [EventType.QUEUED, EventType.STARTED, EventType.FINISHED]
    now = await server.get(task_id)
    assert (now.state, now.progress, now.updated_at) == (
        finished.state,
        finished.progress,
        finished.updated_at,
    )
