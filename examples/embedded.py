"""taskserver inside an aiohttp application you already have.

    python -m examples.embedded                # serves on 127.0.0.1:8080
    python -m examples.embedded --port 9000    # or PORT=9000 python -m examples.embedded

``attach`` adds the task API, the error format and the server's lifecycle (one
``cleanup_ctx``: start before the port is bound, graceful stop after).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from aiohttp import web

from taskserver import TASKSERVER, Settings, TaskContext, TaskServer, attach


async def resize(ctx: TaskContext) -> dict[str, Any]:
    await ctx.progress(1.0, "resized")
    return {"image": ctx.data, "size": "small"}


async def done(ctx: TaskContext, result: Any) -> None:
    return None


async def upload(request: web.Request) -> web.Response:
    task_id = await request.app[TASKSERVER].task({"name": request.match_info["name"]})
    return web.json_response({"id": task_id, "events": f"/tasks/{task_id}/events"}, status=202)


def make_app(settings: Settings | None = None) -> web.Application:
    """Your application, with taskserver attached."""
    server = TaskServer(settings or Settings(db="embedded.db", task_workers=2))
    server.on("task", resize)
    server.on("finish", done)
    app = web.Application()
    app.router.add_post("/images/{name}", upload)
    attach(app, server)
    return app


def main() -> None:
    """Serve on ``--host``/``--port`` (default ``$PORT``, else 8080)."""
    parser = argparse.ArgumentParser(description="taskserver embedded in an aiohttp app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
