"""Worker limits for ``cpu_bound`` callbacks: process slots recycled after N tasks or past
a memory limit, a crashing process costs only its own task, a timeout kills its process.

The callbacks are in ``tests/jobs_helpers.py``: a spawned process imports them by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from taskserver import Settings

from .conftest import sse, wait_for
from .jobs_harness import Jobs, get_json, post, state_of, stored_events
from .jobs_helpers import cpu_crash, cpu_memory, cpu_pid, cpu_span, process_alive


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


async def test_a_process_is_recycled_after_max_tasks(jobs: Jobs) -> None:
    server = await jobs.server(
        cpu_pid, cpu_bound=True, task_workers=1, process_workers=1, process_max_tasks=2
    )
    pids = [(await server.task_wait({}, 20))["pid"] for _ in range(5)]
    assert pids[0] == pids[1]
    assert pids[2] == pids[3]
    assert len({pids[0], pids[2], pids[4]}) == 3
    assert server.stats()["processes"] == {"recycled": 2, "crashed": 0}


async def test_a_process_is_recycled_past_its_memory_limit(jobs: Jobs) -> None:
    server = await jobs.server(
        cpu_memory, cpu_bound=True, task_workers=1, process_workers=1, process_max_memory_mb=150
    )
    small = await server.task_wait({"mb": 0}, 20)
    again = await server.task_wait({"mb": 0}, 20)
    assert small["pid"] == again["pid"]  # well under the limit: kept
    assert server.stats()["processes"]["recycled"] == 0
    big = await server.task_wait({"mb": 200}, 20)
    assert big["pid"] == small["pid"]
    after = await server.task_wait({"mb": 0}, 20)
    assert after["pid"] != big["pid"]
    assert server.stats()["processes"]["recycled"] == 1


async def test_the_limit_counts_the_process_own_memory_not_the_servers(jobs: Jobs) -> None:
    # A server bigger than the limit: ru_maxrss (inherited across spawn) recycled every task.
    ballast = bytearray(200 * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    server = await jobs.server(
        cpu_memory, cpu_bound=True, task_workers=1, process_workers=1, process_max_memory_mb=150
    )
    first = await server.task_wait({"mb": 0}, 20)
    second = await server.task_wait({"mb": 0}, 20)
    assert first["pid"] == second["pid"]
    assert server.stats()["processes"]["recycled"] == 0
    del ballast


async def test_a_crash_costs_only_its_own_task_and_the_pool_recovers(jobs: Jobs) -> None:
    client, server = await jobs.client(cpu_crash, cpu_bound=True, task_workers=2, process_workers=2)
    steady = await post(client, "/tasks", {"data": {"sleep": 1.0}})
    crashing = await post(
        client,
        "/tasks",
        {
            "data": {"crash_on": [1], "sleep": 0.2},
            "max_attempts": 2,
            "retry": {"base": 0.01, "jitter": 0},
        },
    )
    stream = sse(await client.get(f"/tasks/{crashing['id']}/events"))
    events = [(e.event, orjson.loads(e.data)) for e in await stream.collect(timeout=20)]
    assert [name for name, _ in events] == [
        "queued",
        "started",
        "retrying",
        "queued",
        "started",
        "finished",
    ]
    assert "WorkerCrashed" in events[2][1]["error"]
    survivor = await get_json(client, f"/tasks/{steady['id']}?wait=20")
    assert survivor["state"] == "succeeded"
    assert survivor["attempts"] == 1
    # The steady task ran through the crash, in the other slot.
    steady_events = await stored_events(server, steady["id"])
    assert steady_events[1]["at"] < events[2][1]["at"] < steady_events[-1]["at"]
    recovered = await get_json(client, f"/tasks/{crashing['id']}")
    assert recovered["result"]["attempt"] == 2
    assert server.stats()["processes"]["crashed"] == 1
    # Later tasks succeed: both slots work again.
    later = [(await post(client, "/tasks", {"data": {}}))["id"] for _ in range(4)]
    results = await server.wait(later, 20)
    assert all(r["attempt"] == 1 for r in results)


async def test_a_crash_with_no_attempts_left_fails_the_task(jobs: Jobs) -> None:
    server = await jobs.server(cpu_crash, cpu_bound=True, task_workers=1, process_workers=1)
    task_id = await server.task({"crash_on": [1]}, max_attempts=1)
    failed = await state_of(server, task_id, "failed", timeout=20)
    assert failed.error is not None
    assert failed.error.startswith("WorkerCrashed")
    assert (await server.task_wait({}, 20))["attempt"] == 1


async def test_a_timeout_kills_the_process_running_the_task(jobs: Jobs, tmp_path: Path) -> None:
    server = await jobs.server(cpu_crash, cpu_bound=True, task_workers=1, process_workers=1)
    warm = await server.task_wait({}, 20)  # the process exists before the timed task starts
    pid_file = tmp_path / "pid"
    task_id = await server.task(
        {"pid_file": str(pid_file), "sleep": 30}, timeout=3.0, max_attempts=1
    )  # 3 s: time for the process to write its pid on a slow machine
    failed = await state_of(server, task_id, "failed", timeout=15)
    assert failed.error == "TimeoutError: the task ran longer than its timeout of 3s"
    pid = int(pid_file.read_text())
    assert pid == warm["pid"]
    await wait_for(lambda: not process_alive(pid), message=f"process {pid} to be killed")
    after = await server.task_wait({}, 20)
    assert after["pid"] != pid
    assert server.stats()["processes"]["recycled"] == 1


async def test_process_workers_bounds_cpu_bound_tasks_running_at_once(jobs: Jobs) -> None:
    server = await jobs.server(cpu_span, cpu_bound=True, task_workers=3, process_workers=2)
    ids = [await server.task({"sleep": 0.15}) for _ in range(6)]
    spans = await server.wait(ids, 30)
    assert len({s["pid"] for s in spans}) == 2
    # Most spans running at one instant (a sweep over starts and ends): two slots.
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    assert most <= 2
    assert any(
        o is not s and o["start"] < s["end"] and s["start"] < o["end"] for s in spans for o in spans
    ), "the two slots never ran at the same time"


def test_the_helpers_are_importable_module_level_functions() -> None:
    # A spawned process finds callbacks by module and name; keep them where it looks.
    for fn in (cpu_pid, cpu_crash, cpu_memory, cpu_span):
        assert fn.__module__ == "tests.jobs_helpers"
        assert "<locals>" not in fn.__qualname__
