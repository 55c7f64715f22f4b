"""An application for ``taskserver run --app examples.mail:setup``.

It registers the two mandatory callbacks, a queue for bulk work, a periodic
clean-up, and an HTTP route of its own that enqueues a task and answers at once
with its id and topic (the browser then follows the task over SSE).

    taskserver run --task-workers 4 --app examples.mail:setup
    curl -X POST localhost:8080/send -H 'Content-Type: application/json' \\
         -d '{"to": "a@example.com"}'
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from taskserver import (
    TASKSERVER,
    PermanentError,
    RetryPolicy,
    TaskContext,
    TaskServer,
    ValidationError,
    problem,
)

log = logging.getLogger(__name__)


async def send(ctx: TaskContext) -> dict[str, Any]:
    """Pretend to send a mail: validate, report progress, return what was done."""
    to = ctx.data.get("to") if isinstance(ctx.data, dict) else None
    if not isinstance(to, str) or "@" not in to:
        raise PermanentError(f"not an address: {to!r}")  # no point retrying
    await ctx.progress(0.5, "connecting")
    await asyncio.sleep(0.1)
    return {"sent": to, "attempt": ctx.attempt}


async def sent(ctx: TaskContext, result: Any) -> None:
    """Runs in the server process with the task's return value."""
    log.info("task %d done: %r", ctx.id, result)


async def post_send(request: web.Request) -> web.Response:
    """POST /send {"to": ...} → 202 {"id", "topic"}: enqueue and answer at once.

    A body that is not a JSON object with a string ``to`` gets a 4xx problem.
    """
    server = request.app[TASKSERVER]
    try:
        body = await request.json()
    except ValueError:
        return problem(400, "Invalid request", "the body is not valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("to"), str):
        return problem(
            422, "Invalid request", 'send a JSON object with "to": an address', field="to"
        )
    try:
        task_id = await server.task(body, queue="mail", unique_key=f"mail:{body['to']}")
    except ValidationError as exc:  # e.g. an address that cannot be a unique key
        return problem(422, "Invalid request", str(exc), field="to")
    return web.json_response({"id": task_id, "topic": server.topic(task_id)}, status=202)


def setup(server: TaskServer, app: web.Application) -> None:
    """Register callbacks and a queue, and add a route to the application."""
    server.on("task", send)
    server.on("finish", sent)
    server.queue(
        "mail",
        priority=10,
        concurrency=4,
        max_attempts=5,
        retry=RetryPolicy(base=2.0, factor=2.0, cap=600.0),
    )
    app.router.add_post("/send", post_send)
