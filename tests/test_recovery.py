"""Crash and stop a real ``taskserver run`` process: nothing acknowledged is ever lost.

* ``kill -9`` with work in flight: after a restart on the same database every
  task that got a 202 succeeds, and the event history (read live over SSE, then
  resumed with ``Last-Event-ID`` from the new process) never repeats an id.
* A task that keeps killing the process ends ``failed`` once its attempts are used.
* SIGTERM: exit 0; a running task that finishes within the grace period succeeds,
  one that does not is back to ``queued`` and completes after the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .conftest import ServerProcess, SSEEvent, sse, wait_for

RunServer = Callable[..., ServerProcess]
APP = ("--app", "tests.helpers:setup_sleepy")
TERMINAL_EVENTS = ("finished", "failed", "cancelled")


async def start(run_server: RunServer, *args: str) -> ServerProcess:
    # The fixture polls the log with blocking sleeps: keep them off the loop.
    return await asyncio.to_thread(run_server, *APP, *args)


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post_task(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> int:
    async with http.post(f"{base}/tasks", json=body) as response:
        assert response.status == 202, await response.text()
        task_id: int = (await response.json())["id"]
        return task_id


async def all_tasks(http: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await get_json(http, f"{base}/tasks?limit=1000&after={after}")
        tasks += page["tasks"]
        if page["next_after"] is None:
            return tasks
        after = page["next_after"]


async def task_state(http: aiohttp.ClientSession, base: str, task_id: int) -> str:
    task = await get_json(http, f"{base}/tasks/{task_id}")
    state: str = task["state"]
    return state


async def wait_state(
    http: aiohttp.ClientSession, base: str, task_id: int, state: str, message: str
) -> None:
    """Wait until the server reports ``task_id`` in ``state``."""

    async def reached() -> bool:
        return await task_state(http, base, task_id) == state

    await wait_for(reached, message=message)


def db_rows(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [tuple(row) for row in conn.execute(sql, params).fetchall()]


async def record_events(url: str, after: int, sink: list[SSEEvent]) -> None:
    """Append every event of ``GET /events`` after ``after`` to ``sink`` until the stream ends."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/events", headers={"Last-Event-ID": str(after)}) as response,
    ):
        reader = sse(response)
        with contextlib.suppress(aiohttp.ClientError):  # the server was killed under us
            while (event := await reader.next(timeout=30)) is not None:
                sink.append(event)


def terminal_task_ids(events: list[SSEEvent]) -> set[int]:
    return {int(orjson.loads(e.data)["task_id"]) for e in events if e.event in TERMINAL_EVENTS}


async def test_kill_9_loses_no_acknowledged_task(run_server: RunServer, tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    args = ("--db", str(db), "--task-workers", "20", "--heartbeat", "1")
    first = await start(run_server, *args)
    seen_first: list[SSEEvent] = []
    recorder = asyncio.create_task(record_events(first.url, 0, seen_first))
    async with aiohttp.ClientSession() as http:
        body = {"data": {"sleep": 0.2}, "max_attempts": 3}
        acked = await asyncio.gather(*(post_task(http, first.url, body) for _ in range(200)))

        async def in_flight() -> bool:
            stats = await get_json(http, f"{first.url}/stats")
            return bool(stats["succeeded"] >= 10 and stats["running"] > 0 and stats["queued"] > 0)

        await wait_for(in_flight, message="some tasks done, some running, some queued")
    await asyncio.to_thread(first.kill)
    await asyncio.wait_for(recorder, timeout=10)
    assert first.proc.returncode == -signal.SIGKILL

    assert len(set(acked)) == 200
    assert seen_first, "the live stream saw nothing before the crash"
    last_seen = int(seen_first[-1].id or 0)

    second = await start(run_server, *args)
    seen_second: list[SSEEvent] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{second.url}/events", headers={"Last-Event-ID": str(last_seen)}) as response,
    ):
        reader = sse(response)
        while not set(acked) <= terminal_task_ids(seen_first) | terminal_task_ids(seen_second):
            event = await reader.next(timeout=20)
            assert event is not None, "stream ended before every task ended"
            seen_second.append(event)
        tasks = await all_tasks(http, second.url)

    # Every acknowledged task is there, once, and succeeded.
    assert sorted(t["id"] for t in tasks) == sorted(acked)
    assert {t["state"] for t in tasks} == {"succeeded"}
    # No event id repeats across the two processes, and none goes backwards.
    ids = [int(e.id or 0) for e in seen_first + seen_second]
    assert ids == sorted(set(ids)), "an event id repeated or went backwards"
    # Work really was in flight: some tasks were recovered and ran a second time.
    recovered = [
        orjson.loads(data)["task_id"]
        for (data,) in db_rows(db, "SELECT data FROM events WHERE type = 'queued' ORDER BY id")
        if orjson.loads(data).get("recovered")
    ]
    assert recovered
    rerun = {t["id"]: t["attempts"] for t in tasks if t["id"] in recovered}
    assert set(rerun.values()) == {2}
    # What the clients saw is exactly what the file holds: nothing missed, nothing made up.
    stored = db_rows(db, "SELECT id, data FROM events WHERE id <= ? ORDER BY id", ids[-1])
    assert [(int(e.id or 0), e.data) for e in seen_first + seen_second] == stored
    assert await asyncio.to_thread(second.terminate) == 0


async def test_task_that_kills_the_process_fails_after_its_attempts(
    run_server: RunServer, tmp_path: Path
) -> None:
    db = tmp_path / "suicide.db"
    gate = tmp_path / "die-now"
    args = ("--db", str(db), "--task-workers", "1")
    body = {"data": {"until_file": str(gate), "die": True}, "max_attempts": 2}

    task_id = 0
    for round_ in range(2):
        gate.unlink(missing_ok=True)
        server = await start(run_server, *args)
        async with aiohttp.ClientSession() as http:
            if round_ == 0:
                task_id = await post_task(http, server.url, body)

            async def running(
                url: str = server.url, http: aiohttp.ClientSession = http, task_id: int = task_id
            ) -> bool:
                return await task_state(http, url, task_id) == "running"

            await wait_for(running, message=f"attempt {round_ + 1} running")
        gate.touch()  # now the task kills its own process
        code = await asyncio.to_thread(server.proc.wait, 20)
        assert code == -signal.SIGKILL
        assert db_rows(db, "SELECT state, attempts FROM tasks WHERE id = ?", task_id) == [
            ("running", round_ + 1)
        ]

    gate.unlink()
    last = await start(run_server, *args)
    async with aiohttp.ClientSession() as http:
        task = await get_json(http, f"{last.url}/tasks/{task_id}")
        assert task["state"] == "failed"
        assert task["attempts"] == 2
        assert task["error"]
        async with http.get(f"{last.url}/tasks/{task_id}/events") as response:
            events = await sse(response).collect(timeout=10)
    types = [e.event for e in events]
    assert types[-1] == "failed"
    assert types.count("started") == 2
    assert await asyncio.to_thread(last.terminate) == 0


async def test_sigterm_lets_a_running_task_finish_and_keeps_the_queue(
    run_server: RunServer, tmp_path: Path
) -> None:
    db = tmp_path / "stop.db"
    gate = tmp_path / "quick"
    args = ("--db", str(db), "--task-workers", "1", "--grace-period", "5")
    first = await start(run_server, *args)
    async with aiohttp.ClientSession() as http:
        running = await post_task(http, first.url, {"data": {"until_file": str(gate)}})
        waiting = [await post_task(http, first.url, {"data": {"sleep": 0}}) for _ in range(3)]

        await wait_state(http, first.url, running, "running", "the first task running")

    first.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: "stopping" in first.log.read_text(), message="the server stops")
    gate.touch()  # the running task finishes within the grace period
    assert await asyncio.to_thread(first.proc.wait, 15) == 0

    states = dict(db_rows(db, "SELECT id, state FROM tasks"))
    assert states[running] == "succeeded"
    assert [states[i] for i in waiting] == ["queued"] * 3  # never started, still queued

    second = await start(run_server, *args)
    async with aiohttp.ClientSession() as http:

        async def all_succeeded() -> bool:
            tasks = await all_tasks(http, second.url)
            return {t["state"] for t in tasks} == {"succeeded"}

        await wait_for(all_succeeded, message="every task succeeded after the restart")
        first_task = await get_json(http, f"{second.url}/tasks/{running}")
        assert first_task["attempts"] == 1  # not run again
    assert await asyncio.to_thread(second.terminate) == 0


async def test_sigterm_ends_open_event_streams_and_exits_0(
    run_server: RunServer, tmp_path: Path
) -> None:
    server = await start(run_server, "--db", str(tmp_path / "streams.db"))
    async with aiohttp.ClientSession() as http:
        task_id = await post_task(http, server.url, {"data": {}})
        async with (
            http.get(f"{server.url}/events?lastEventID=0") as everything,
            http.get(f"{server.url}/events") as live_only,
        ):
            first = await sse(everything).next()
            assert first is not None
            assert orjson.loads(first.data)["task_id"] == task_id
            server.proc.send_signal(signal.SIGTERM)
            # Open streams do not hold the shutdown up: both end, the process exits 0.
            await sse(everything).collect(timeout=10)
            await sse(live_only).collect(timeout=10)
    assert await asyncio.to_thread(server.proc.wait, 10) == 0


async def test_sigterm_requeues_a_task_that_outlives_the_grace_period(
    run_server: RunServer, tmp_path: Path
) -> None:
    db = tmp_path / "stop.db"
    gate = tmp_path / "slow"
    args = ("--db", str(db), "--task-workers", "1", "--grace-period", "0.5")
    first = await start(run_server, *args)
    async with aiohttp.ClientSession() as http:
        slow = await post_task(http, first.url, {"data": {"until_file": str(gate)}})

        await wait_state(http, first.url, slow, "running", "the task running")

    first.proc.send_signal(signal.SIGTERM)

    def requeued() -> bool:
        return db_rows(db, "SELECT state, attempts FROM tasks WHERE id = ?", slow) == [
            ("queued", 0)  # back in the queue, the interrupted attempt handed back
        ]

    await wait_for(requeued, message="the interrupted task re-queued")
    assert await asyncio.to_thread(first.proc.wait, 8) == 0

    gate.touch()
    second = await start(run_server, *args)
    async with aiohttp.ClientSession() as http:
        await wait_state(
            http, second.url, slow, "succeeded", "the task completes after the restart"
        )
    assert await asyncio.to_thread(second.terminate) == 0


async def test_sigterm_exits_while_a_thread_task_still_blocks(
    run_server: RunServer, tmp_path: Path
) -> None:
    db = tmp_path / "thread.db"
    gate = tmp_path / "never-yet"
    args = ("--db", str(db), "--task-workers", "1", "--grace-period", "0.5")
    app = ("--app", "tests.helpers:setup_blocking_thread")
    first = await asyncio.to_thread(run_server, *app, *args)
    async with aiohttp.ClientSession() as http:
        blocked = await post_task(http, first.url, {"data": {"until_file": str(gate)}})

        await wait_state(http, first.url, blocked, "running", "the thread task running")

    first.proc.send_signal(signal.SIGTERM)

    def requeued() -> bool:
        return db_rows(db, "SELECT state, attempts FROM tasks WHERE id = ?", blocked) == [
            ("queued", 0)
        ]

    await wait_for(requeued, message="the interrupted task re-queued")
    # The thread cannot be interrupted, but it must not keep the process alive.
    assert await asyncio.to_thread(first.proc.wait, 6) == 0

    gate.touch()
    second = await asyncio.to_thread(run_server, *app, *args)
    async with aiohttp.ClientSession() as http:
        await wait_state(
            http, second.url, blocked, "succeeded", "the task completes after the restart"
        )
    assert await asyncio.to_thread(second.terminate) == 0


async def test_sys_exit_in_a_thread_task_fails_only_that_task(
    run_server: RunServer, tmp_path: Path
) -> None:
    app = ("--app", "tests.helpers:setup_exiting_thread")
    server = await asyncio.to_thread(run_server, *app, "--db", str(tmp_path / "exit.db"))
    async with aiohttp.ClientSession() as http:
        doomed = await post_task(http, server.url, {"data": "exit"})

        async def ended() -> bool:
            try:
                state = await task_state(http, server.url, doomed)
            except aiohttp.ClientConnectionError:
                code = await asyncio.to_thread(server.proc.wait, 10)
                raise AssertionError(f"the server died (exit code {code})") from None
            return state in ("failed", "succeeded")

        await wait_for(ended, message="the task ended")
        task = await get_json(http, f"{server.url}/tasks/{doomed}")
        assert task["state"] == "failed"
        assert "SystemExit" in task["error"]
        fine = await post_task(http, server.url, {"data": "fine"})

        async def fine_done() -> bool:
            return await task_state(http, server.url, fine) == "succeeded"

        await wait_for(fine_done, message="the next task succeeded")
    assert await asyncio.to_thread(server.terminate) == 0
