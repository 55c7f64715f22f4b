"""Apps for the attempt-counting tests (``taskserver run --app tests.attempt_apps:...``).

Importable by name, as ``--app`` needs. Each task records what it does in files
named by its data, so the test (another process) can see it after a ``kill -9``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from taskserver import TaskContext, TaskServer


async def _finish(ctx: TaskContext, result: Any) -> None:
    return None


async def dies_at_once(ctx: TaskContext) -> None:
    """Kill the whole server process (SIGKILL on itself) the moment it starts."""
    os.kill(os.getpid(), signal.SIGKILL)


def setup_dies_at_once(server: TaskServer) -> None:
    """Every task kills the process as soon as it starts (see ``dies_at_once``)."""
    server.on("task", dies_at_once)
    server.on("finish", _finish)


def _append(path: str, line: str) -> None:
    # One write() with O_APPEND: whole lines, survives the process being killed.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


async def logs_its_attempt(ctx: TaskContext) -> dict[str, Any]:
    """Append ``id:attempt`` to ``data["log"]`` first thing, then sleep ``data["sleep"]``.

    With ``data["die_once"]`` (a path) the first task to see it missing creates it
    and kills the server process at once, right after logging its attempt.
    """
    data = ctx.data
    _append(data["log"], f"{ctx.id}:{ctx.attempt}\n")
    marker = data.get("die_once")
    # Blocking on purpose: nothing else may run between the log line and the kill.
    if marker is not None and not os.path.exists(marker):  # noqa: ASYNC240
        _append(marker, "died\n")
        os.kill(os.getpid(), signal.SIGKILL)
    await asyncio.sleep(float(data.get("sleep", 0.0)))
    return {"attempt": ctx.attempt}


def setup_logs_attempts(server: TaskServer) -> None:
    """Tasks log each (id, attempt) they run (see ``logs_its_attempt``)."""
    server.on("task", logs_its_attempt)
    server.on("finish", _finish)
