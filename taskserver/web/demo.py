"""The built-in demo, served when ``taskserver run`` is given no ``--app``.

A live dashboard at ``/`` (``static/dashboard.*``): counts, running tasks,
recent tasks and failures, updated over ``EventSource``, and a button that
starts a task: a few seconds of work that reports progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import PermanentError
from ..runtime.workers import TaskContext
from ..server import TaskServer

log = logging.getLogger(__name__)

#: The dashboard's HTML, CSS and JS, served under ``/static/``.
STATIC = Path(__file__).with_name("static")
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


#: No other site may frame the dashboard (clickjacking its Cancel and Retry buttons).
FRAMING = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}


async def index(request: web.Request) -> web.Response:
    page = resources.files("taskserver.web").joinpath("static/dashboard.html").read_text("utf-8")
    return web.Response(text=page, content_type="text/html", headers=FRAMING)


def _static_file(path: Path) -> Callable[[web.Request], Awaitable[web.FileResponse]]:
    async def send(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers=FRAMING)

    return send


def setup(server: TaskServer, app: web.Application) -> None:
    """Register the demo callbacks, the dashboard at ``/`` and its files under ``/static/``.

    Each file has a route of its own (not ``add_static``) so that every response of
    the dashboard, ``/static/dashboard.html`` too, carries ``FRAMING``.
    """
    server.on("task", demo_task)
    server.on("finish", demo_finish)
    app.router.add_get("/", index)
    for path in sorted(STATIC.iterdir()):
        if path.is_file():
            app.router.add_get(f"/static/{path.name}", _static_file(path))
