"""The built-in demo, served when ``taskserver run`` is given no ``--app``.

The live dashboard (``dashboard.py``) answers ``/`` as well as ``dashboard_path``,
with a button that starts a demo task: a few seconds of work that reports progress.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from ..errors import PermanentError
from ..runtime.context import TaskContext
from ..server import TaskServer

log = logging.getLogger(__name__)

#: Set on the application by the demo's setup: ``attach`` serves the dashboard at ``/``.
DEMO: web.AppKey[bool] = web.AppKey("taskserver_demo", bool)
#: Steps a demo task takes; each reports progress.
STEPS = 10


async def demo_task(ctx: TaskContext) -> dict[str, Any]:
    """Sleep ``data.seconds`` (default 3, at most 60) in steps, reporting progress."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    seconds = min(60.0, max(0.0, float(data.get("seconds", 3))))
    for step in range(1, STEPS + 1):
        await asyncio.sleep(seconds / STEPS)
        await ctx.progress(step / STEPS, f"step {step} of {STEPS}")
        if data.get("fail") and step == STEPS // 2:
            raise PermanentError("asked to fail half way")
    return {"slept": seconds, "worker": ctx.worker_id}


async def demo_finish(ctx: TaskContext, result: Any) -> None:
    """Log the result: ``finish`` runs in the server process once the task returned."""
    log.debug("demo task %d finished: %r", ctx.id, result, extra={"task_id": ctx.id})


def setup(server: TaskServer, app: web.Application) -> None:
    """Register the demo callbacks; ``attach`` then serves the dashboard at ``/`` too.

    The dashboard is mounted by ``attach`` (at ``dashboard_path``); the demo asks it
    to answer ``/`` as well, with its Request form.
    """
    server.on("task", demo_task)
    server.on("finish", demo_finish)
    app[DEMO] = True
