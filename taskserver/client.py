"""A Python client for taskserver's HTTP API, for another process or service.

``Client`` is async (aiohttp); ``SyncClient`` runs one ``Client`` on its own event loop
in a daemon thread, so it works from plain code and from inside another running loop
alike, and keeps one connection pool across calls. Errors are the package's own:

* 404 → ``TaskNotFound``; 409 → ``Conflict``; 401/403 → ``AccessDenied`` (``status``);
* 400/422 (and other 4xx) → ``ValidationError`` with the problem's ``field``;
* 503 → ``ServerBusy`` with ``retry_after`` from the ``Retry-After`` header;
* anything else → ``TaskServerError`` with the problem's detail.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson

from .errors import (
    AccessDenied,
    Conflict,
    ServerBusy,
    TaskNotFound,
    TaskServerError,
    ValidationError,
)

T = TypeVar("T")
#: Longest long poll the server allows per request (``api.MAX_WAIT``).
POLL = 60
#: Longest SSE line accepted: bounds memory against a misbehaving server.
MAX_LINE = 1 << 20


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One Server-Sent Event: ``data`` is the text; ``json()`` decodes it."""

    id: str | None
    event: str
    data: str

    def json(self) -> Any:
        """``data`` decoded as JSON (task events always are)."""
        return orjson.loads(self.data)


def _error(status: int, body: Any, headers: Any) -> TaskServerError:
    problem = body if isinstance(body, dict) else {}
    detail = str(problem.get("detail") or body or f"HTTP {status}")
    field = problem.get("field")
    if status == 404 and field == "id":
        return _not_found(detail)
    if status in (401, 403):
        return AccessDenied(detail, status=status, challenge=headers.get("WWW-Authenticate"))
    if status == 409:
        return Conflict(detail)
    if status == 503:
        try:
            retry_after = float(headers.get("Retry-After", "1"))
        except ValueError:
            retry_after = 1.0
        return ServerBusy(detail, retry_after=retry_after)
    if 400 <= status < 500 and status != 404:
        return ValidationError(detail, field=field if isinstance(field, str) else None)
    return TaskServerError(f"{detail} (HTTP {status})")


def _not_found(detail: str) -> TaskNotFound:
    words = [w for w in detail.split() if w.isdigit()]
    error = TaskNotFound(int(words[0]) if words else 0)
    error.args = (detail,)
    return error


class Client:
    """An async client: ``async with Client("http://127.0.0.1:8080", token=...) as c``.

    ``token`` is sent as ``Authorization: Bearer``. Call ``close()`` (or use ``async
    with``) to release the connections.
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"<Client {self.base_url} {'open' if self._http else 'idle'}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool; the client may be used again (it reopens)."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers)
        return self._http

    async def _call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """One request; its JSON body, or the package's exception for an error."""
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        limit = aiohttp.ClientTimeout(total=timeout or self._timeout)
        async with self._session().request(
            method, self.base_url + path, data=data, headers=headers, timeout=limit
        ) as response:
            raw = await response.read()
            try:
                payload = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                payload = raw.decode(errors="replace").strip()
            if response.status >= 400:
                raise _error(response.status, payload, response.headers)
            return payload

    async def task(self, data: Any, **options: Any) -> int:
        """Enqueue one task (options as ``TaskServer.task``, JSON values); its id."""
        created = await self._call("POST", "/tasks", {"data": data, **options})
        return int(created["id"])

    async def task_many(self, tasks: list[dict[str, Any]]) -> list[int]:
        """Enqueue ``[{"data": ..., options...}, ...]`` all or none; their ids in order."""
        created = await self._call("POST", "/tasks:batch", {"tasks": tasks})
        return [int(t["id"]) for t in created["tasks"]]

    async def get(self, task_id: int) -> dict[str, Any]:
        """The task as ``GET /tasks/{id}`` answers it."""
        task: dict[str, Any] = await self._call("GET", f"/tasks/{int(task_id)}")
        return task

    async def wait(self, task_id: int, timeout: float | None = None) -> dict[str, Any]:
        """The task once it has ended, long-polling ``?wait=``; ``TimeoutError`` past
        ``timeout`` seconds (``None``: wait as long as it takes)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = POLL if deadline is None else max(0.0, deadline - loop.time())
            poll = max(0, min(POLL, int(left)))
            task: dict[str, Any] = await self._call(
                "GET", f"/tasks/{int(task_id)}?wait={poll}", timeout=poll + self._timeout
            )
            if task["state"] in ("succeeded", "failed", "cancelled"):
                return task
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"task {task_id} still {task['state']} after {timeout}s")

    async def cancel(self, task_id: int) -> dict[str, Any]:
        """Cancel the task; ``Conflict`` when it has ended."""
        task: dict[str, Any] = await self._call("DELETE", f"/tasks/{int(task_id)}")
        return task

    async def retry(self, task_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled task again; ``Conflict`` otherwise."""
        task: dict[str, Any] = await self._call("POST", f"/tasks/{int(task_id)}/retry")
        return task

    async def queues(self) -> list[dict[str, Any]]:
        """Every queue as ``GET /queues`` lists it: counts, concurrency, paused."""
        answer: dict[str, Any] = await self._call("GET", "/queues")
        return list(answer["queues"])

    async def pause_queue(self, name: str) -> dict[str, Any]:
        """Pause queue ``name`` (it takes tasks and starts none, across restarts)."""
        queue: dict[str, Any] = await self._call("POST", f"/queues/{quote(name, safe='')}/pause")
        return queue

    async def resume_queue(self, name: str) -> dict[str, Any]:
        """Resume queue ``name``."""
        queue: dict[str, Any] = await self._call("POST", f"/queues/{quote(name, safe='')}/resume")
        return queue

    async def events(self, task_id: int, after: int = 0) -> AsyncGenerator[ServerEvent, None]:
        """The task's events (SSE), stored then live, until its last one ends the stream."""
        headers = {"Last-Event-ID": str(after)} if after else None
        limit = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout)
        async with self._session().get(
            f"{self.base_url}/tasks/{int(task_id)}/events", headers=headers, timeout=limit
        ) as response:
            if response.status >= 400:
                raw = await response.read()
                try:
                    payload = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    payload = raw.decode(errors="replace")
                raise _error(response.status, payload, response.headers)
            if response.status == 204:
                return
            async for event in parse_sse(response.content):
                yield event


async def parse_sse(stream: aiohttp.StreamReader) -> AsyncIterator[ServerEvent]:
    """Events of a ``text/event-stream`` body (the WHATWG parsing rules), to its end.

    Comments (``:``) are skipped, ``data`` lines join with ``\\n``, a blank line
    dispatches, an event with no data is dropped, ``id`` persists across events.
    """
    last_id: str | None = None
    event, data = "", list[str]()
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except ValueError:  # aiohttp's LineTooLong: past its own bound
            raise TaskServerError("an event stream line is too long") from None
        if not raw.endswith(b"\n"):
            return  # the end of the stream (a partial event is dropped, as browsers do)
        if len(raw) > MAX_LINE:
            raise TaskServerError("an event stream line is too long")
        line = raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
        if not line:
            if data:
                yield ServerEvent(last_id, event or "message", "\n".join(data))
            event, data = "", list[str]()
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value


class SyncClient:
    """``Client`` for plain code: each method blocks; ``events`` is a plain iterator.

    Runs a private event loop in a daemon thread (so it also works where a loop is
    already running); ``close()`` (or ``with``) stops it.
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskserver-client", daemon=True
        )
        self._thread.start()
        self._client = Client(base_url, token, timeout=timeout)

    def __repr__(self) -> str:
        return f"<SyncClient {self._client.base_url}>"

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the connections and stop the loop thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def task(self, data: Any, **options: Any) -> int:
        """As ``Client.task``."""
        return self._run(self._client.task(data, **options))

    def task_many(self, tasks: list[dict[str, Any]]) -> list[int]:
        """As ``Client.task_many``."""
        return self._run(self._client.task_many(tasks))

    def get(self, task_id: int) -> dict[str, Any]:
        """As ``Client.get``."""
        return self._run(self._client.get(task_id))

    def wait(self, task_id: int, timeout: float | None = None) -> dict[str, Any]:
        """As ``Client.wait``."""
        return self._run(self._client.wait(task_id, timeout))

    def cancel(self, task_id: int) -> dict[str, Any]:
        """As ``Client.cancel``."""
        return self._run(self._client.cancel(task_id))

    def retry(self, task_id: int) -> dict[str, Any]:
        """As ``Client.retry``."""
        return self._run(self._client.retry(task_id))

    def queues(self) -> list[dict[str, Any]]:
        """As ``Client.queues``."""
        return self._run(self._client.queues())

    def pause_queue(self, name: str) -> dict[str, Any]:
        """As ``Client.pause_queue``."""
        return self._run(self._client.pause_queue(name))

    def resume_queue(self, name: str) -> dict[str, Any]:
        """As ``Client.resume_queue``."""
        return self._run(self._client.resume_queue(name))

    def events(self, task_id: int, after: int = 0) -> Iterator[ServerEvent]:
        """As ``Client.events``, one event per ``next()``; closing it ends the stream."""
        stream = self._client.events(task_id, after)

        async def step() -> ServerEvent:
            return await anext(stream)

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._run(stream.aclose())
