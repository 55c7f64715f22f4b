"""An attempt is counted before its callback runs, even when the process dies at once.

Real ``taskserver run`` processes whose task callbacks ``SIGKILL`` the server the
moment they start, before any commit could record the start:

* a task that always does so ends ``failed`` after ``max_attempts`` and the server
  stays up, instead of crash-looping forever;
* under load, no ``(id, attempt)`` pair runs twice across the kill and the restart.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import ROOT, wait_for

LISTENING = re.compile(r"listening on (http://\S+)")


class Spawned:
    """A ``taskserver run`` process that may die before it ever listens."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.proc = proc
        self.log = log

    def url(self) -> str | None:
        match = LISTENING.search(self.log.read_text())
        return match.group(1) if match else None


Spawn = Callable[..., Spawned]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start ``python -m taskserver run --port 0 ...`` without waiting; kill leftovers."""
    procs: list[Spawned] = []

    def start(*args: str) -> Spawned:
        log = tmp_path / f"server-{len(procs)}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskserver", "run", "--port", "0", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                cwd=tmp_path,
            )
        spawned = Spawned(proc, log)
        procs.append(spawned)
        return spawned

    yield start
    for spawned in procs:
        if spawned.proc.poll() is None:
            spawned.proc.kill()
            spawned.proc.wait(10)


async def listening(server: Spawned, what: str, timeout: float = 20.0) -> str:
    """Wait until ``server`` listens; fail, with its log, if it exits first."""

    def up() -> str | None:
        if server.proc.poll() is not None:
            raise AssertionError(
                f"{what}: the server exited {server.proc.returncode}:\n{server.log.read_text()}"
            )
        return server.url()

    url: str = await wait_for(up, timeout=timeout, message=f"{what}: the server listening")
    return url


async def killed(server: Spawned, what: str) -> None:
    """Wait until ``server`` died of SIGKILL (its own task sent it)."""
    code = await asyncio.to_thread(server.proc.wait, 30)
    assert code == -signal.SIGKILL, f"{what}: exit {code}:\n{server.log.read_text()}"


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with http.post(url, json=body) as response:
        assert response.status == 202, await response.text()
        return await response.json()


async def get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


def db_rows(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [tuple(row) for row in conn.execute(query, params).fetchall()]


async def test_a_task_that_kills_the_process_at_once_fails_after_max_attempts(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "dies.db"
    args = ("--app", "tests.attempt_apps:setup_dies_at_once", "--db", str(db))

    first = spawn(*args)
    url = await listening(first, "first start")
    async with aiohttp.ClientSession() as http:
        # The task may kill the process before the 202 is on the wire: it was committed.
        with contextlib.suppress(aiohttp.ClientError):
            await post(http, f"{url}/tasks", {"data": {}, "max_attempts": 2})
        await killed(first, "attempt 1")
    [(task_id,)] = db_rows(db, "SELECT id FROM tasks")

    # The restart recovers the task with one attempt counted and runs attempt 2,
    # which kills this process too (maybe before it even listens).
    second = spawn(*args)
    await killed(second, "attempt 2")

    # Both attempts are counted, none is left: the task is failed and the server stays up.
    third = spawn(*args)
    url = await listening(third, "third start")
    async with aiohttp.ClientSession() as http:
        try:
            task = await get(http, f"{url}/tasks/{task_id}")
        except aiohttp.ClientConnectionError:
            code = await asyncio.to_thread(third.proc.wait, 10)
            raise AssertionError(f"the third start died too (exit {code}): a crash loop") from None
        assert task["state"] == "failed", task
        assert task["attempts"] == 2
        assert "died" in task["error"], task["error"]
        # Still up after answering, with nothing left to run.
        health = await get(http, f"{url}/healthz")
        assert health
        stats = await get(http, f"{url}/stats")
        assert (stats["queued"], stats["running"], stats["failed"]) == (0, 0, 1)
    assert third.proc.poll() is None, third.log.read_text()
    assert db_rows(db, "SELECT state, attempts FROM tasks WHERE id = ?", task_id) == [("failed", 2)]
    third.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(third.proc.wait, 30) == 0


async def test_no_attempt_runs_twice_after_a_kill_9_under_load(
    spawn: Spawn, tmp_path: Path
) -> None:
    db = tmp_path / "load.db"
    runs = tmp_path / "runs.log"
    marker = tmp_path / "died-once"
    args = (
        "--app",
        "tests.attempt_apps:setup_logs_attempts",
        "--db",
        str(db),
        "--task-workers",
        "16",
    )
    work = {"log": str(runs), "sleep": 0.002}
    # The task in the middle kills the process right after logging its attempt,
    # while the others are starting and finishing around it.
    items = [{"data": work, "max_attempts": 3} for _ in range(600)]
    items[300] = {"data": {**work, "die_once": str(marker)}, "max_attempts": 3}

    first = spawn(*args)
    url = await listening(first, "first start")
    async with aiohttp.ClientSession() as http:
        ids = [t["id"] for t in (await post(http, f"{url}/tasks:batch", {"tasks": items}))["tasks"]]
        await killed(first, "the kill under load")
    assert marker.exists()
    killer = ids[300]

    second = spawn(*args)
    url = await listening(second, "restart")
    async with aiohttp.ClientSession() as http:

        async def all_done() -> bool:
            stats = await get(http, f"{url}/stats")
            return bool(stats["succeeded"] == len(ids))

        await wait_for(all_done, timeout=30, message="every task succeeded after the restart")
    second.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.proc.wait, 30) == 0

    lines = runs.read_text().split()
    counts = collections.Counter(lines)
    twice = sorted(pair for pair, n in counts.items() if n > 1)
    assert twice == [], f"{len(twice)} (id, attempt) pairs ran twice: {twice[:10]}"
    assert {int(line.split(":")[0]) for line in lines} == set(ids)
    # The task that killed the process ran attempt 1, then (after the restart) attempt 2.
    assert [line for line in lines if line.startswith(f"{killer}:")] == [
        f"{killer}:1",
        f"{killer}:2",
    ]
    assert db_rows(db, "SELECT attempts FROM tasks WHERE id = ?", killer) == [(2,)]
