"""The counts ``GET /stats`` serves are kept in memory and agree with the rows.

``QueueCounts`` (``runtime/counts.py``) is seeded once at start and kept as
tasks move; these tests compare it with what the backend counts from the
committed rows (``count_by_queue``, ``count_by_state``) after a mixed workload:
enqueue into several queues, success, failure, an automatic retry, cancels (in
the ready queue, on disk, delayed), manual retries, a purge, and a restart
after ``kill -9`` with tasks left running (recovered by ``Backend.open``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from taskserver import RetryPolicy, Settings, TaskContext, TaskServer
from taskserver.models import TaskState
from taskserver.runtime.counts import QueueCounts

from .conftest import ServerProcess, wait_for
from .jobs_harness import Gate, Jobs


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


async def _disagreement(server: TaskServer) -> str:
    """Empty when memory and rows agree; else what differs (for the failure message)."""
    counts = server._shared.counts
    memory_queues = {
        queue: {state.value: n for state, n in states.items()}
        for queue, states in (await counts.active_by_queue()).items()
    }
    rows_queues = {
        queue: {state.value: n for state, n in states.items() if n}
        for queue, states in (await server.store.count_by_queue()).items()
    }
    memory_totals = {state.value: n for state, n in counts.totals.items()}
    rows_totals = {state.value: n for state, n in (await server.store.count_by_state()).items()}
    if memory_queues == rows_queues and memory_totals == rows_totals:
        return ""
    return f"memory {memory_queues} {memory_totals}\nrows   {rows_queues} {rows_totals}"


async def assert_counts_match(server: TaskServer, *, settle: float = 10.0) -> None:
    """Memory and rows agree once the pending batch committed (memory moves at append time)."""
    last = ""

    async def agree() -> bool:
        nonlocal last
        last = await _disagreement(server)
        return not last

    try:
        await wait_for(agree, timeout=settle, message="in-memory counts to match the rows")
    except AssertionError:
        raise AssertionError(f"counts differ:\n{last}") from None


class Mixed:
    """``data["do"]``: ``ok``, ``fail`` (raises), ``flaky`` (fails its first attempt), ``hold``."""

    def __init__(self) -> None:
        self.gate = Gate()

    async def __call__(self, ctx: TaskContext) -> Any:
        do = ctx.data["do"]
        if do == "hold":
            await self.gate.wait()
        if do == "fail" or (do == "flaky" and ctx.attempt == 1):
            raise ValueError(f"{do} on attempt {ctx.attempt}")
        return {"attempt": ctx.attempt}


def _queues(server: TaskServer) -> None:
    server.queue("a", concurrency=1)
    server.queue("b", priority=1)


async def test_counts_per_queue_follow_a_mixed_workload(jobs: Jobs) -> None:
    task = Mixed()
    server = await jobs.server(task, configure=_queues, task_workers=2, ready_window=2)
    fast = RetryPolicy(base=0.01, jitter=0)
    holds = [await server.task({"do": "hold"}, queue="b") for _ in range(2)]
    await wait_for(lambda: server.stats()["running"] == 2, message="both workers held")
    queued = [await server.task({"do": "ok"}, queue=q) for q in ("a", "default") * 6]
    delayed = [await server.task({"do": "ok"}, queue="b", delay=3600) for _ in range(3)]
    failing = [
        await server.task({"do": "fail"}, queue=q, max_attempts=1) for q in ("a", "c", "c", "d")
    ]
    flaky = [
        await server.task({"do": "flaky"}, queue="c", max_attempts=2, retry=fast) for _ in "xy"
    ]
    await assert_counts_match(server)
    assert (await server.queue_stats())["b"]["waiting"] == 3

    # Cancel: in the ready queue, on disk (behind the small ready window), delayed.
    for task_id in (queued[0], queued[-1], delayed[0]):
        await server.cancel(task_id)
    await assert_counts_match(server)

    task.gate.open()
    ids = [*holds, *queued[1:-1], *failing, *flaky]
    for task_id in ids:
        await server.wait_terminal(task_id, timeout=20)
    await assert_counts_match(server)
    stats = server.stats()
    assert (stats["succeeded"], stats["failed"], stats["cancelled"]) == (14, 4, 3)
    assert set(await server.queue_stats()) >= {"b"}, "queue b still holds its delayed tasks"

    # Manual retries: a failed task fails again, a cancelled one succeeds.
    await server.retry(failing[1])
    await server.retry(queued[0])
    for task_id in (failing[1], queued[0]):
        await server.wait_terminal(task_id, timeout=20)
    await assert_counts_match(server)

    # Purge: ended tasks go, one ended state at a time.
    purged = await server.purge(0)
    assert purged == 21
    await assert_counts_match(server)
    assert server.stats()["tasks"] == {
        "queued": 0,
        "waiting": 2,
        "running": 0,
        "retrying": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    b = (await server.queue_stats())["b"]
    assert (b["queued"], b["waiting"], b["running"]) == (0, 2, 0)


RunServer = Callable[..., ServerProcess]


async def test_counts_are_seeded_after_recovery_from_kill_9(
    run_server: RunServer, tmp_path: Path, settings: Settings, jobs: Jobs
) -> None:
    db = tmp_path / "crashed.db"
    gate = tmp_path / "never"
    proc = await asyncio.to_thread(
        run_server, "--app", "tests.helpers:setup_sleepy", f"--db={db}", "--task-workers=2"
    )
    async with aiohttp.ClientSession() as http:

        async def post(body: dict[str, Any]) -> int:
            async with http.post(f"{proc.url}/tasks", json=body) as response:
                assert response.status == 202, await response.text()
                task_id: int = (await response.json())["id"]
                return task_id

        # Two left running, one of them on its last attempt (recovery fails it).
        await post({"data": {"until_file": str(gate)}, "queue": "x", "max_attempts": 3})
        await post({"data": {"until_file": str(gate)}, "queue": "y", "max_attempts": 1})

        async def both_running() -> bool:
            async with http.get(f"{proc.url}/stats") as response:
                return bool((await response.json())["running"] == 2)

        await wait_for(both_running, message="two tasks running")
        for queue in ("x", "y", "y", "z"):
            await post({"data": {"until_file": str(gate)}, "queue": queue})
        await post({"data": {}, "queue": "z", "delay": 3600})
        await asyncio.to_thread(proc.kill)

    server = await jobs.server(db=str(db), task_workers=0)
    stats = server.stats()["tasks"]
    assert (stats["running"], stats["failed"], stats["waiting"]) == (0, 1, 1), stats
    assert stats["queued"] == 5, stats
    await assert_counts_match(server, settle=0)
    assert {
        q: (row["queued"], row["waiting"]) for q, row in (await server.queue_stats()).items()
    } == {"default": (0, 0), "x": (2, 0), "y": (2, 0), "z": (1, 1)}
    # Work after the restart keeps them exact.
    cancelled = await server.cancel(await server.task({}, queue="z"))
    assert cancelled.state is TaskState.CANCELLED
    await server.task({}, queue="w")
    await assert_counts_match(server)


def test_a_queue_with_no_active_task_left_is_dropped() -> None:
    counts = QueueCounts()
    counts.seed({TaskState.SUCCEEDED: 7}, {"a": {TaskState.QUEUED: 1, TaskState.WAITING: 0}})
    assert asyncio.run(counts.active_by_queue()) == {"a": {TaskState.QUEUED: 1}}
    counts.move("a", TaskState.QUEUED, TaskState.RUNNING)
    counts.move("a", TaskState.RUNNING, TaskState.SUCCEEDED)
    assert asyncio.run(counts.active_by_queue()) == {}
    assert counts[TaskState.SUCCEEDED] == 8
    counts.purged(TaskState.SUCCEEDED, 8)
    assert counts[TaskState.SUCCEEDED] == 0
    with pytest.raises(ValueError, match="queued"):
        counts.purged(TaskState.QUEUED, 1)
