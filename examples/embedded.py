"""taskserver inside an aiohttp application you already have.

    python -m examples.embedded        # serves on 127.0.0.1:8080

``attach`` adds the task API, the error format and the server's lifecycle (one
``cleanup_ctx``: start before the port is bound, graceful stop after).
"""

from __future__ import annotations

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


if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=8080)
