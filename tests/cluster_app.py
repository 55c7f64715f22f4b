"""The app the multi-node tests run on every node: ``--app tests.cluster_app:setup``.

Its task callback records each execution in the file named by ``$CLUSTER_RECORD``, one
JSON line when it starts and one when it ends (task id, attempt, node pid, wall-clock
time, the task's ``tag``), appended with ``O_APPEND`` and one ``write()`` per line: a
line under ``PIPE_BUF`` bytes is never interleaved with another process's, and the page
cache keeps what was written when the node is killed with ``kill -9``. The test reads
the file back (``tests/cluster.py``: ``read_executions``) to check that each attempt ran
on exactly one node, and when.

``data`` may hold ``sleep`` (seconds to take), ``tag`` (any short string, copied to
the record) and ``die`` (then, after its sleep, the task kills its own node with
SIGKILL). Declared on every node: the queue ``limited`` (``concurrency=2``, counted
over the cluster); ``setup_cron`` also schedules ``tick`` every two seconds.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import time
from typing import Any

import orjson

from taskserver import TaskContext, TaskServer

#: The environment variable naming the record file (every node appends to the same one).
RECORD_ENV = "CLUSTER_RECORD"
#: The queue whose concurrency limit the tests check across nodes.
LIMITED_QUEUE = "limited"
LIMITED_CONCURRENCY = 2
#: Every two seconds (six fields: seconds first), so a due time is never ambiguous.
TICK_CRON = "*/2 * * * * *"
TICK_EVERY = 2.0


def record(kind: str, ctx: TaskContext) -> None:
    """Append one execution line (``kind``: ``start`` or ``end``) in a single ``write()``."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    data = ctx.data if isinstance(ctx.data, dict) else {}
    line = orjson.dumps(
        {
            "kind": kind,
            "id": ctx.id,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "t": time.time(),
            "tag": str(data.get("tag", ""))[:200],
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )
    assert len(line) <= select.PIPE_BUF
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def recorded_task(ctx: TaskContext) -> dict[str, Any]:
    """Record the start, take ``data["sleep"]`` seconds, record the end; say where it ran."""
    record("start", ctx)
    data = ctx.data if isinstance(ctx.data, dict) else {}
    await asyncio.sleep(float(data.get("sleep", 0.0)))
    if data.get("die"):  # as a task that crashes the interpreter would
        os.kill(os.getpid(), signal.SIGKILL)
    record("end", ctx)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


async def finished(ctx: TaskContext, result: Any) -> None:
    return None


def setup(server: TaskServer) -> None:
    """Recorded tasks and the cluster-limited queue."""
    server.on("task", recorded_task)
    server.on("finish", finished)
    server.queue(LIMITED_QUEUE, concurrency=LIMITED_CONCURRENCY)


def setup_cron(server: TaskServer) -> None:
    """``setup`` plus the schedule ``tick`` (every two seconds, UTC)."""
    setup(server)
    server.schedule("tick", TICK_CRON, {"tag": "tick"})
