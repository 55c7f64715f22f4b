"""Module-level callbacks and setup functions the tests hand to real servers.

Everything here must be importable by name (``tests.helpers:...``): the CLI
loads setups with ``--app``, and a spawned pool process imports CPU-bound
callbacks by module and name.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from typing import Any

from taskserver import PermanentError, ProcessTaskContext, SyncTaskContext, TaskContext, TaskServer


def stored_progress_events(db: str, task_id: int) -> list[tuple[int, str]]:
    """``(event id, json)`` of the progress events stored for ``task_id``, read directly."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, data FROM events WHERE task_id = ? AND type = 'progress' ORDER BY id",
            (task_id,),
        ).fetchall()
    return [(int(row[0]), str(row[1])) for row in rows]


# --- a CPU-bound callback, run in a spawned process ------------------------------------


def cpu_task(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Report progress, wait (bounded) until the server stored it, and say where it ran."""
    ctx.progress(0.5, "half way")
    db = ctx.data["db"]
    deadline = time.monotonic() + 10.0
    seen = False
    while time.monotonic() < deadline:
        if stored_progress_events(db, ctx.id):
            seen = True
            break
        time.sleep(0.01)
    return {
        "pid": os.getpid(),
        "id": ctx.id,
        "data": ctx.data,
        "attempt": ctx.attempt,
        "worker_id": ctx.worker_id,
        "progress_stored": seen,
    }


# --- setups for `taskserver run --app tests.helpers:<name>` -----------------------------


async def _finish(ctx: TaskContext, result: Any) -> None:
    return None


async def _echo(ctx: TaskContext) -> Any:
    return {"echo": ctx.data}


def setup_missing_finish(server: TaskServer) -> None:
    """Registers a task callback only: the server must refuse to start."""
    server.on("task", _echo)


def setup_with_authorizer(server: TaskServer) -> None:
    """Echo tasks; the application lets through requests with ``X-User: admin`` only."""
    server.on("task", _echo)
    server.on("finish", _finish)
    server.authorize(lambda request, scope: request.headers.get("X-User") == "admin")


def setup_missing_task(server: TaskServer) -> None:
    """Registers a finish callback only: the server must refuse to start."""
    server.on("finish", _finish)


async def sleepy_task(ctx: TaskContext) -> dict[str, Any]:
    """Sleep ``data["sleep"]`` seconds; with ``data["until_file"]``, wait until it exists.

    Then, with ``data["die"]``, kill the whole server process (``kill -9`` on
    itself), as a task that crashes the interpreter would.
    """
    data = ctx.data if isinstance(ctx.data, dict) else {}
    await asyncio.sleep(float(data.get("sleep", 0.0)))
    gate = data.get("until_file")
    if gate is not None:
        # Polled in a thread: the gate is a file so another process (the test) can open it.
        while True:
            if await asyncio.to_thread(os.path.exists, gate):
                break
            await asyncio.sleep(0.02)
    if data.get("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    return {"slept": data.get("sleep", 0.0), "attempt": ctx.attempt}


def setup_sleepy(server: TaskServer) -> None:
    """Tasks that take a little while (see ``sleepy_task``)."""
    server.on("task", sleepy_task)
    server.on("finish", _finish)


def blocking_thread_task(ctx: SyncTaskContext) -> dict[str, Any]:
    """A plain function that blocks its thread until ``data["until_file"]`` exists (at most 60 s).

    It does not look at ``ctx.cancelled``, as code blocked in a library call cannot.
    """
    gate = ctx.data["until_file"]
    deadline = time.monotonic() + 60.0
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"attempt": ctx.attempt}


def setup_blocking_thread(server: TaskServer) -> None:
    """Tasks run in a thread and block it (see ``blocking_thread_task``)."""
    server.on("task", blocking_thread_task)
    server.on("finish", _finish)


def exiting_thread_task(ctx: SyncTaskContext) -> Any:
    """Calls ``sys.exit(3)`` (as library code such as argparse does) when asked to."""
    if ctx.data == "exit":
        sys.exit(3)
    return ctx.data


def setup_exiting_thread(server: TaskServer) -> None:
    """A thread task that may call ``sys.exit`` (see ``exiting_thread_task``)."""
    server.on("task", exiting_thread_task)
    server.on("finish", _finish)


def cpu_wait_for_file(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Block this pool process until ``data["until_file"]`` exists (at most 20 s)."""
    deadline = time.monotonic() + 20.0
    while not os.path.exists(ctx.data["until_file"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {"pid": os.getpid(), "data": ctx.data}


async def _failing_finish(ctx: TaskContext, result: Any) -> None:
    raise RuntimeError(f"finish failed for {ctx.data!r}")


def setup_failing_finish(server: TaskServer) -> None:
    """Echo tasks whose ``finish`` callback raises: the server logs it, about the task."""
    server.on("task", _echo)
    server.on("finish", _failing_finish)


async def flaky_task(ctx: TaskContext) -> dict[str, Any]:
    """Fail (permanently) while ``data["fail_until"]`` names a file that does not exist;
    sleep ``data["sleep"]`` first. The dashboard tests retry the failures once it exists."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    await asyncio.sleep(float(data.get("sleep", 0.0)))
    gate = data.get("fail_until")
    if gate is not None and not await asyncio.to_thread(os.path.exists, gate):
        raise PermanentError(f"{gate} does not exist yet")
    return {"ok": True, "attempt": ctx.attempt}


def setup_flaky(server: TaskServer) -> None:
    """An application of its own (not the demo): ``flaky_task`` in queues mail and pdf."""
    server.on("task", flaky_task)
    server.on("finish", _finish)
    server.queue("mail", concurrency=2)
    server.queue("pdf")
