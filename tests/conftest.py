"""Shared fixtures: real stores in tmp_path, real servers, real SSE streams.

Fixtures are factories that close what they made. Tests wait for conditions
(``wait_for``), never for a fixed time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import Settings, TaskContext, TaskServer, attach

from .pg_server import PostgresServer, find_bindir

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Poll ``condition`` (sync or async) until it returns something truthy; return that."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


@dataclass
class SSEEvent:
    """One event as a client sees it."""

    id: str | None
    event: str | None
    data: str
    retry: int | None = None


@dataclass
class SSEReader:
    """Parses a real ``text/event-stream`` body, event by event."""

    response: aiohttp.ClientResponse
    comments: list[str] = field(default_factory=list)

    async def next(self, timeout: float = 10.0) -> SSEEvent | None:
        """The next event, or ``None`` at end of stream."""
        fields: dict[str, list[str]] = {}
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if line == "":
                    if "data" in fields or "id" in fields or "event" in fields:
                        retry = fields.get("retry", [None])[-1]
                        return SSEEvent(
                            id=fields.get("id", [None])[-1],
                            event=fields.get("event", [None])[-1],
                            data="\n".join(fields.get("data", [])),
                            retry=int(retry) if retry else None,
                        )
                    fields.clear()
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)

    async def collect(self, count: int | None = None, timeout: float = 10.0) -> list[SSEEvent]:
        """Events until the stream ends (or ``count`` of them)."""
        events: list[SSEEvent] = []
        while count is None or len(events) < count:
            event = await self.next(timeout)
            if event is None:
                break
            events.append(event)
        return events


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for a test server: a fresh SQLite file, 2 workers, fast heartbeats."""
    return Settings(
        db=str(tmp_path / "tasks.db"), task_workers=2, port=0, heartbeat=1.0, grace_period=2.0
    )


async def noop_task(ctx: TaskContext) -> Any:
    return {"echo": ctx.data}


async def noop_finish(ctx: TaskContext, result: Any) -> None:
    return None


ServerFactory = Callable[..., Awaitable[TaskServer]]


@pytest.fixture
async def make_server(settings: Settings) -> AsyncIterator[ServerFactory]:
    """Start TaskServers (default callbacks echo the data); stops them all afterwards."""
    started: list[TaskServer] = []

    async def factory(
        task: Callable[..., Any] | None = noop_task,
        finish: Callable[..., Any] | None = noop_finish,
        *,
        cpu_bound: bool = False,
        **overrides: Any,
    ) -> TaskServer:
        values = {**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, **overrides}
        server = TaskServer(Settings(**values))
        if task is not None:
            server.on("task", task, cpu_bound=cpu_bound)
        if finish is not None:
            server.on("finish", finish)
        await server.start()
        started.append(server)
        return server

    yield factory
    for server in reversed(started):
        await server.stop()


ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def make_client(settings: Settings, aiohttp_client: Any) -> ClientFactory:
    """Real aiohttp servers on loopback running taskserver, and clients for them."""

    async def factory(
        task: Callable[..., Any] | None = noop_task,
        finish: Callable[..., Any] | None = noop_finish,
        **overrides: Any,
    ) -> TestClient[web.Request, web.Application]:
        values = {**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, **overrides}
        server = TaskServer(Settings(**values))
        if task is not None:
            server.on("task", task)
        if finish is not None:
            server.on("finish", finish)
        app = web.Application(client_max_size=server.settings.max_body_bytes)
        attach(app, server)
        client: TestClient[web.Request, web.Application] = await aiohttp_client(app)
        return client

    return factory  # aiohttp_client closes the clients (and so stops the servers)


def sse(response: aiohttp.ClientResponse) -> SSEReader:
    """Read ``response`` as an event stream."""
    assert response.status == 200, response.status
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return SSEReader(response)


# --- a real `taskserver run` process -------------------------------------------------


@dataclass
class ServerProcess:
    """A ``taskserver run`` subprocess on a loopback port."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    def kill(self) -> None:
        """``kill -9``: no cleanup, no flush."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


#: In a text line or in a JSON one (``--log-format json``): the URL ends before a quote.
LISTENING = re.compile(r"listening on (https?://[^\s\"]+)")


@pytest.fixture
def run_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python -m taskserver run ...`` processes; kills any left at the end."""
    procs: list[ServerProcess] = []

    def start(
        *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
    ) -> ServerProcess:
        log = tmp_path / f"server-{len(procs)}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        with log.open("w") as out:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                [sys.executable, "-m", "taskserver", "run", "--port", "0", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env=full_env,
                cwd=tmp_path,
            )
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(log.read_text())
            if match:
                server = ServerProcess(proc, match.group(1), log)
                procs.append(server)
                return server
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
            time.sleep(0.02)
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"server did not start:\n{log.read_text()}")

    yield start
    for server in procs:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


# --- a private PostgreSQL ------------------------------------------------------------


def postgres_missing(ci: bool) -> None:
    """No PostgreSQL binaries: skip on a developer's machine, fail loudly in CI."""
    message = (
        "no PostgreSQL server binaries (initdb, postgres, pg_isready) found via pg_config, "
        "/usr/lib/postgresql/*/bin or PATH: install Debian's postgresql package"
    )
    if ci:
        pytest.fail(f"CI is set: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL for the whole session (initdb + start ~0.5 s).

    ``postgres.dsn`` is its maintenance database; ``postgres.create_database()`` (or
    ``await postgres.create_database_async()``) makes a fresh empty one per test and
    returns its DSN. They are dropped, and the server stopped, at the end.
    """
    bindir = find_bindir()
    if bindir is None:
        postgres_missing(bool(os.environ.get("CI")))
        raise AssertionError("unreachable")  # skip and fail raise
    server = PostgresServer.start(bindir)
    try:
        yield server
        server.drop_created()
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres: PostgresServer) -> str:
    """The DSN of a fresh empty database of the session's PostgreSQL."""
    return postgres.create_database()


# --- the loop must never block --------------------------------------------------------

#: A callback holding the event loop this long is reported (asyncio debug mode).
SLOW_CALLBACK = 0.5


class SlowCallbacks(logging.Handler):
    """Collects asyncio's "Executing <handle> took N seconds" reports, but the test's own.

    A step that held the loop at least ``least`` seconds counts unless it was the
    test's: its coroutines and helpers (code in tests/) and the asyncio streams it
    drives as a client (``open_connection``; the server never uses asyncio streams).
    Those may be slow on a busy machine or block on purpose (they start subprocesses,
    read files); server code, aiohttp handlers and workers must not. A report naming no
    file counts.
    """

    #: Where the handle or task that held the loop was: the first ``at FILE:LINE``.
    HELD_AT = re.compile(r" at (\S+?):\d+")
    TOOK = re.compile(r" took (\d+(?:\.\d+)?) seconds$")
    TEST_CODE = (
        str(Path(__file__).parent) + os.sep,
        str(Path(asyncio.__file__).parent / "streams.py"),
    )

    def __init__(self, least: float = SLOW_CALLBACK) -> None:
        super().__init__(logging.WARNING)
        self.least = least
        self.reports: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        took = self.TOOK.search(message)
        if (
            message.startswith("Executing")
            and took
            and float(took.group(1)) >= self.least
            and self.counts(message)
        ):
            self.reports.append(message)

    @classmethod
    def counts(cls, message: str) -> bool:
        """Whether the step reported in ``message`` counts: it was not the test's own."""
        if "coro=<test_" in message:
            return False
        held = cls.HELD_AT.search(message)
        return held is None or not held.group(1).startswith(cls.TEST_CODE)


@pytest.fixture(autouse=True)
async def loop_never_blocks() -> AsyncIterator[None]:
    """Fail a test during which anything but its own code held the loop too long
    (``SlowCallbacks``)."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    handler = SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert handler.reports == [], "the event loop was blocked:\n" + "\n".join(handler.reports)
