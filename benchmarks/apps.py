"""What the benchmark's server processes run.

``noop_setup`` is the ``--app`` given to ``taskserver run`` for the HTTP figure:
async no-op ``task`` and ``finish`` callbacks, so the request path and the
durable enqueue are what is measured, not the work.

``python -m benchmarks.apps hello --port 0`` serves the HTTP baseline: a plain
aiohttp app on uvloop, with no taskserver in it, whose ``POST /tasks`` reads
the body and answers a small JSON ``202``. It logs
``hello listening on http://HOST:PORT`` like ``taskserver run`` does and stops
on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
from typing import Any

from aiohttp import web

from taskserver import TaskContext, TaskServer

from .common import run

HELLO_BODY = b'{"id":1,"state":"queued"}'


async def noop_task(ctx: TaskContext) -> None:
    """The ``task`` callback of the benchmark app: does nothing."""


async def noop_finish(ctx: TaskContext, result: Any) -> None:
    """The ``finish`` callback of the benchmark app: does nothing."""


def noop_setup(server: TaskServer) -> None:
    """``taskserver run --app benchmarks.apps:noop_setup``: no-op callbacks, no demo page."""
    server.on("task", noop_task)
    server.on("finish", noop_finish)


def stub_setup(server: TaskServer) -> None:
    """``noop_setup`` whose ``POST /tasks`` skips the enqueue (``benchmarks.httpgap``): the
    same route, middlewares, guard, body parsing and 202, but nothing stored or run."""
    noop_setup(server)
    ids = itertools.count(1)

    async def submit_parsed(data: Any, options: dict[str, Any]) -> tuple[int, str, bool]:
        return next(ids), "queued", False

    server.submit_parsed = submit_parsed  # type: ignore[method-assign,assignment]


async def hello(request: web.Request) -> web.Response:
    """The baseline handler: read the body, answer a fixed JSON 202."""
    await request.read()
    return web.Response(body=HELLO_BODY, status=202, content_type="application/json")


async def serve_hello(host: str, port: int) -> None:
    """Serve the hello-world app until SIGTERM or SIGINT."""
    app = web.Application()
    app.router.add_post("/tasks", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        address = runner.addresses[0]
        print(f"hello listening on http://{address[0]}:{address[1]}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apps")
    parser.add_argument("app", choices=("hello",))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    run(serve_hello(args.host, args.port))


if __name__ == "__main__":
    main()
