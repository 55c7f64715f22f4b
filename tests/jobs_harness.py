"""What the job-semantics tests (``test_jobs_*.py``) share.

* ``Jobs``: a harness that starts real ``TaskServer`` s configured *before* they
  start (queues, defaults, hooks, schedules, an injected clock), either alone or
  behind a real aiohttp server, and stops them all at the end.
* ``Clock``: wall time plus an offset the test moves; ``server.poke()`` then
  re-checks due times, so long delays test without sleeping.
* Small HTTP and Python-API helpers (problem+json checks, polling a state).

The ``cpu_bound`` callbacks are in ``jobs_helpers.py``, which a spawned process imports.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import TASKSERVER, Settings, TaskContext, TaskServer, attach

from .conftest import noop_finish, noop_task, wait_for

Client = TestClient[web.Request, web.Application]
Configure = Callable[[TaskServer], None]
PROBLEM = "application/problem+json"


class Clock:
    """``time.time()`` plus an offset that only the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float, *servers: TaskServer) -> None:
        """Move time forward and make ``servers`` look at their due times again."""
        self.offset += seconds
        for server in servers:
            server.poke()


class Jobs:
    """Starts configured servers (and HTTP clients for them); stops them all on exit."""

    def __init__(self, settings: Settings, aiohttp_client: Any) -> None:
        self.settings = settings
        self._aiohttp_client = aiohttp_client
        self._servers: list[TaskServer] = []

    async def __aenter__(self) -> Jobs:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for server in reversed(self._servers):
            await server.stop()

    def new(
        self,
        task: Callable[..., Any] | None = noop_task,
        finish: Callable[..., Any] | None = noop_finish,
        *,
        configure: Configure | None = None,
        clock: Callable[[], float] = time.time,
        cpu_bound: bool = False,
        **overrides: Any,
    ) -> TaskServer:
        """A configured server that has not started."""
        fields = self.settings.__dataclass_fields__
        values = {**{f: getattr(self.settings, f) for f in fields}, **overrides}
        server = TaskServer(Settings(**values), clock=clock)
        if task is not None:
            server.on("task", task, cpu_bound=cpu_bound)
        if finish is not None:
            server.on("finish", finish)
        if configure is not None:
            configure(server)
        return server

    async def server(
        self,
        task: Callable[..., Any] | None = noop_task,
        finish: Callable[..., Any] | None = noop_finish,
        *,
        configure: Configure | None = None,
        clock: Callable[[], float] = time.time,
        cpu_bound: bool = False,
        **overrides: Any,
    ) -> TaskServer:
        """A started server (same arguments as ``new``)."""
        server = self.new(
            task, finish, configure=configure, clock=clock, cpu_bound=cpu_bound, **overrides
        )
        await server.start()
        self._servers.append(server)
        return server

    async def client(
        self,
        task: Callable[..., Any] | None = noop_task,
        finish: Callable[..., Any] | None = noop_finish,
        *,
        configure: Configure | None = None,
        clock: Callable[[], float] = time.time,
        cpu_bound: bool = False,
        **overrides: Any,
    ) -> tuple[Client, TaskServer]:
        """A real HTTP server on loopback running a configured task server, and a client."""
        server = self.new(
            task, finish, configure=configure, clock=clock, cpu_bound=cpu_bound, **overrides
        )
        app = web.Application(client_max_size=server.settings.max_body_bytes)
        attach(app, server)
        client: Client = await self._aiohttp_client(app)
        assert client.app is not None
        assert client.app[TASKSERVER] is server
        return client, server


# --- HTTP helpers --------------------------------------------------------------------


async def post(client: Client, path: str, body: Any, status: int = 202) -> dict[str, Any]:
    """POST JSON, check the status, return the JSON body."""
    response = await client.post(path, json=body)
    text = await response.text()
    assert response.status == status, f"{response.status}: {text}"
    answer: dict[str, Any] = await response.json(content_type=None)
    return answer


async def get_json(client: Client, path: str, status: int = 200) -> dict[str, Any]:
    """GET, check the status, return the JSON body."""
    response = await client.get(path)
    text = await response.text()
    assert response.status == status, f"{response.status}: {text}"
    answer: dict[str, Any] = await response.json(content_type=None)
    return answer


async def refused(
    response: aiohttp.ClientResponse, status: int, field: str | None
) -> dict[str, Any]:
    """Check ``response`` is a problem+json refusal with ``status`` naming ``field``."""
    text = await response.text()
    assert response.status == status, f"{response.status}: {text}"
    assert response.content_type == PROBLEM, response.content_type
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == status
    if field is not None:
        assert body["field"] == field, body
        assert body["invalid_params"][0]["name"] == field
    return body


async def all_tasks(client: Client) -> list[dict[str, Any]]:
    """Every task, through ``GET /tasks``."""
    tasks: list[dict[str, Any]] = (await get_json(client, "/tasks?limit=1000"))["tasks"]
    return tasks


async def http_state(client: Client, task_id: int, *states: str) -> dict[str, Any]:
    """Poll ``GET /tasks/{id}`` until the task is in one of ``states``; return it."""

    async def reached() -> dict[str, Any] | None:
        task = await get_json(client, f"/tasks/{task_id}")
        return task if task["state"] in states else None

    found: dict[str, Any] = await wait_for(reached, message=f"task {task_id} in {states}")
    return found


# --- Python API helpers ------------------------------------------------------------


async def state_of(server: TaskServer, task_id: int, *states: str, timeout: float = 10.0) -> Any:
    """Poll ``server.get`` until the task is in one of ``states``; return the task."""

    async def reached() -> Any:
        task = await server.get(task_id)
        return task if task.state.value in states else None

    return await wait_for(reached, timeout=timeout, message=f"task {task_id} in {states}")


async def event_types(server: TaskServer, task_id: int) -> list[str]:
    """The stored event types of one task, oldest first."""
    return [str(e.type) for e in await server.events_after(0, task_id=task_id)]


async def stored_events(server: TaskServer, task_id: int) -> list[dict[str, Any]]:
    """The stored event payloads of one task, oldest first."""
    return [e.data for e in await server.events_after(0, task_id=task_id)]


def db_rows(db: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows read straight from the SQLite file (call it through ``asyncio.to_thread``)."""
    with sqlite3.connect(db) as conn:
        return [tuple(row) for row in conn.execute(query, params).fetchall()]


async def query(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """``db_rows`` off the event loop."""
    return await asyncio.to_thread(db_rows, db, sql, params)


class Gate:
    """An ``asyncio.Event`` a task callback waits on, with a bound so a test cannot hang."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def open(self) -> None:
        self.event.set()

    async def wait(self, timeout: float = 20.0) -> bool:
        """Wait until opened, at most ``timeout`` seconds; ``False`` if it never opened.

        Never raises ``TimeoutError``: a callback that lets one escape hits a product bug
        (see ``test_jobs_retry.test_callback_raising_timeout_error_without_a_timeout``).
        """
        try:
            async with asyncio.timeout(timeout):
                await self.event.wait()
        except TimeoutError:
            return False
        return True


async def echo_task(ctx: TaskContext) -> Any:
    return {"echo": ctx.data}


async def flaky_task(ctx: TaskContext) -> Any:
    """Fail (``ValueError``) while ``ctx.attempt <= data["fail"]``, then echo the attempt."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    if ctx.attempt <= int(data.get("fail", 0)):
        raise ValueError(f"boom on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


def retry_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``retrying`` events among stored or streamed event payloads."""
    return [e for e in events if e["type"] == "retrying"]
