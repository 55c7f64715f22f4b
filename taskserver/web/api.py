"""The HTTP API: every route in one table, short handlers, errors as problem+json.

Handlers parse and check input, call one ``TaskServer`` method and serialise the
answer. Any ``TaskServerError`` (or aiohttp ``HTTPException``) becomes an
``application/problem+json`` body (RFC 9457) that names the field at fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web

from .. import lifecycle
from ..errors import Conflict, ServerBusy, TaskNotFound, ValidationError
from ..lifecycle import TERMINAL
from ..models import Task, TaskState
from ..problems import guard, problem
from ..push.mercure import MercureHub
from ..push.origins import discovery_links
from ..push.sse import stream_events, subscribe_events
from ..runtime.options import OPTIONS, TaskSpec
from ..server import TaskServer
from . import operate
from .access import ADMIN, ENQUEUE, METRICS, READ, READ_TASK, Access, Need
from .http import (
    ACCESS,
    MAX_PAGE,
    PREFIX,
    SERVER,
    Handler,
    int_param,
    is_id,
    json_response,
    query_param,
    read_json_object,
)
from .metrics import Metrics
from .openapi import document

log = logging.getLogger(__name__)

#: The server's Prometheus registry (``metrics.py``).
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("taskserver_metrics", Metrics)

TASK_FIELDS = frozenset({"data"}) | OPTIONS
#: Most tasks one ``POST /tasks:batch`` may carry.
MAX_BATCH = 10_000
#: Longest ``?wait=`` long poll, in seconds.
MAX_WAIT = 60
#: How long ``/readyz`` waits for its probe write: a probe answers well within it.
READY_PROBE_TIMEOUT = 2.0
#: ``Retry-After`` of a 503 from ``/readyz``, in seconds.
READY_RETRY_AFTER = 5


def task_id_of(request: web.Request) -> int:
    """The ``{id}`` path part as a positive integer, or a 404 naming it."""
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18 or int(raw) < 1:
        raise web.HTTPNotFound(text=f"task id must be a positive integer, got {raw!r}")
    return int(raw)


def last_event_id(request: web.Request) -> int:
    """``Last-Event-ID`` header, else ``lastEventID`` query parameter; 0 when absent."""
    raw = request.headers.get("Last-Event-ID")
    name = "Last-Event-ID"
    if raw is None:
        raw, name = query_param(request, "lastEventID"), "lastEventID"
    if raw is None or raw == "":
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ValidationError(f"{name} must be an event id (an integer), got {raw!r}", field=name)
    return int(raw)


# --- handlers --------------------------------------------------------------------


def _links(request: web.Request, server: TaskServer, task_id: int) -> dict[str, Any]:
    url = f"{request.app[PREFIX]}/tasks/{task_id}"  # an f-string: url_for() costs a lot per call
    return {"url": url, "events_url": f"{url}/events", "topic": server.topic(task_id)}


def _task_response(request: web.Request, server: TaskServer, task: Task) -> web.Response:
    links = _links(request, server, task.id)
    # The task's topic, for Mercure clients: the resource they subscribe to.
    self_link = f'<{links["topic"]}>; rel="self"'
    return json_response({**task.to_json(), **links}, headers={"Link": self_link})


def _spec(body: dict[str, Any], where: str = "") -> TaskSpec:
    """``body`` (its keys already checked) as data and options; it is consumed."""
    if "data" not in body:
        raise ValidationError("data is required (any JSON value)", field=f"{where}data")
    data = body.pop("data")  # what is left are the options
    return TaskSpec(data, body)


async def create_task(request: web.Request) -> web.Response:
    """``POST /tasks {"data", options...}`` → 202 with the new id (200 for a unique match)."""
    server = request.app[SERVER]
    body = await read_json_object(request, TASK_FIELDS)
    if "data" not in body:
        raise ValidationError("data is required (any JSON value)", field="data")
    # What is left of the body once data is taken are the options (no TaskSpec and no
    # Submitted: two frozen dataclasses fewer per request). The data was parsed here.
    task_id, state, existing = await server.submit_parsed(body.pop("data"), body)
    url = f"{request.app[PREFIX]}/tasks/{task_id}"  # url_for() costs a lot per call
    if existing:
        task = await server.get(task_id)
        state = lifecycle.RUNNING if server.is_running(task.id) else task.state
        status = 200
    else:
        status = 202
    answer = {
        "id": task_id,
        "state": state,
        "existing": existing,
        "url": url,
        "events_url": f"{url}/events",
        "topic": server.topic(task_id),
    }
    return json_response(answer, status=status, headers={"Location": url})


async def create_batch(request: web.Request) -> web.Response:
    """``POST /tasks:batch {"tasks": [{"data", options...}, ...]}`` → 202, all or nothing."""
    server = request.app[SERVER]
    body = await read_json_object(request, frozenset({"tasks"}))
    items = body.get("tasks")
    if not isinstance(items, list) or not items:
        raise ValidationError("tasks must be a non-empty array of task objects", field="tasks")
    if len(items) > MAX_BATCH:
        raise ValidationError(f"at most {MAX_BATCH} tasks per batch", field="tasks")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValidationError("each task must be an object", field=f"tasks[{i}]")
        for key in item:
            if key not in TASK_FIELDS:
                raise ValidationError(f"unknown field {key!r}", field=f"tasks[{i}].{key}")
        specs.append(_spec(item, f"tasks[{i}]."))
    submitted = await server.task_many(specs)
    return json_response(
        {
            "tasks": [
                {"id": s.id, "existing": s.existing, **_links(request, server, s.id)}
                for s in submitted
            ]
        },
        status=202,
    )


async def get_task(request: web.Request) -> web.Response:
    """``GET /tasks/{id}[?wait=s]`` → the task; ``wait`` long-polls until it ends."""
    server = request.app[SERVER]
    task_id = task_id_of(request)
    wait = int_param(request, "wait", 0, 0, MAX_WAIT)
    task = await server.get(task_id)
    if wait and task.state not in TERMINAL:
        try:
            task = await server.wait_terminal(task_id, timeout=wait)
        except TimeoutError:
            task = await server.get(task_id)
    return _task_response(request, server, task)


async def retry_task(request: web.Request) -> web.Response:
    """``POST /tasks/{id}/retry`` → the task, queued again (409 unless failed/cancelled)."""
    server = request.app[SERVER]
    task = await server.retry(task_id_of(request))
    return _task_response(request, server, task)


async def admin_retry(request: web.Request) -> web.Response:
    """``POST /tasks:retry {"ids": [...]} | {"failed": true}`` → ids re-queued, errors per id."""
    server = request.app[SERVER]
    body = await read_json_object(request, frozenset({"ids", "failed"}))
    failed = body.get("failed", False)
    if not isinstance(failed, bool):
        raise ValidationError("failed must be true or false", field="failed")
    if failed and "ids" in body:
        raise ValidationError('give "ids" or "failed": true, not both', field="ids")
    if failed:
        return json_response({"retried": await server.retry_failed(), "errors": {}})
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(is_id(i) for i in ids):
        raise ValidationError('give "ids": [positive integers] or "failed": true', field="ids")
    retried: list[int] = []
    errors: dict[str, str] = {}
    for task_id in ids:
        try:
            await server.retry(task_id)
            retried.append(task_id)
        except (TaskNotFound, Conflict) as exc:
            errors[str(task_id)] = str(exc)
    return json_response({"retried": retried, "errors": errors})


async def admin_purge(request: web.Request) -> web.Response:
    """``POST /tasks:purge {"older_than": s, "states"?: [...]}`` → how many were deleted."""
    server = request.app[SERVER]
    body = await read_json_object(request, frozenset({"older_than", "states"}))
    older_than = body.get("older_than")
    if isinstance(older_than, bool) or not isinstance(older_than, int | float) or older_than < 0:
        raise ValidationError("older_than must be a number of seconds >= 0", field="older_than")
    raw_states = body.get("states", ["succeeded", "failed", "cancelled"])
    ended = {s.value for s in TERMINAL}
    if (
        not isinstance(raw_states, list)
        or not raw_states
        or any(not isinstance(s, str) or s not in ended for s in raw_states)
    ):
        raise ValidationError(
            f"states must be a list of {', '.join(sorted(ended))}", field="states"
        )
    purged = await server.purge(float(older_than), [TaskState(s) for s in raw_states])
    return json_response({"purged": purged})


async def cancel_task(request: web.Request) -> web.Response:
    """``DELETE /tasks/{id}`` → the task, cancelled (409 when it has ended)."""
    server = request.app[SERVER]
    task = await server.cancel(task_id_of(request))
    return _task_response(request, server, task)


async def task_events(request: web.Request) -> web.StreamResponse:
    """``GET /tasks/{id}/events`` → SSE: stored events, then live ones, until the end.

    ``204`` to a cursor at or past the last event of an ended task: ``EventSource``
    reconnects whenever a stream ends, and a 204 is what makes it stop.
    """
    server = request.app[SERVER]
    task_id = task_id_of(request)
    after = last_event_id(request)
    await server.follow_events()  # before subscribing: told of other servers' events
    subscription = subscribe_events(server.fanout, server.topic(task_id))
    try:
        task = await server.get(task_id)  # 404 before the stream starts
        # Committed state: an ended task's last event is stored by now.
        done = (
            after > 0
            and task.state in TERMINAL
            and not await server.events_after(after, task_id=task_id, limit=1)
        )
    except BaseException:
        subscription.close()
        raise
    if done:
        subscription.close()
        return web.Response(status=204)

    async def replay(after_id: int) -> list[Any]:
        return await server.events_after(after_id, task_id=task_id)

    return await stream_events(
        request,
        subscription,
        replay,
        after=after,
        heartbeat=server.settings.heartbeat,
        until_terminal=True,
    )


async def all_events(request: web.Request) -> web.StreamResponse:
    """``GET /events`` → SSE of every task event; resumes after ``Last-Event-ID``.

    Without a ``Last-Event-ID`` the stream starts with live events only.
    """
    server = request.app[SERVER]
    has_cursor = "Last-Event-ID" in request.headers or "lastEventID" in request.query
    await server.follow_events()  # first: the cursor below is the cluster's then
    # Without a cursor: from the last *committed* event. Ids handed out but not yet
    # committed must still come, live, once they are.
    after = last_event_id(request) if has_cursor else server.committed_event_id
    subscription = subscribe_events(server.fanout)

    async def replay(after_id: int) -> list[Any]:
        return await server.events_after(after_id)

    return await stream_events(
        request, subscription, replay, after=after, heartbeat=server.settings.heartbeat
    )


async def stats(request: web.Request) -> web.Response:
    """``GET /stats[?queues=false]`` → worker and task counters, the hour's history, and
    active tasks per queue (``TaskServer.queue_stats``, counts kept as tasks move;
    ``queues=false`` leaves it out, and ``queues`` is then what memory holds per queue,
    as ``TaskServer.stats``)."""
    server = request.app[SERVER]
    raw = query_param(request, "queues")
    if raw is None:
        raw = "true"
    if raw not in ("true", "false"):
        raise ValidationError(f"queues must be true or false, got {raw!r}", field="queues")
    body = {**server.stats(), "history": server.history()}
    if raw == "true":
        body["queues"] = await server.queue_stats()
    return json_response(body)


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz`` → 200 while the process serves HTTP: liveness, nothing more.

    Draining or a store that cannot write is for ``/readyz``: a liveness probe that
    failed then would have the process restarted in the middle of its shutdown.
    """
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz`` → 200 when tasks can be taken and stored; 503 + Retry-After while
    the server drains or while its store cannot write (e.g. a full disk).

    After a failed write, each check makes one real write (shared by concurrent
    checks, at most ``READY_PROBE_TIMEOUT`` s) to learn whether writes commit again.
    The body names no cause: the log has it.
    """
    server = request.app[SERVER]
    if not server.accepting:
        return _not_ready("the server is shutting down")
    if server.cannot_write() is not None:
        with contextlib.suppress(ServerBusy, TimeoutError):
            await asyncio.wait_for(asyncio.shield(server.probe_write()), READY_PROBE_TIMEOUT)
        if server.cannot_write() is not None:
            return _not_ready("the store cannot write")
    return json_response({"status": "ready"})


async def openapi_document(request: web.Request) -> web.Response:
    """``GET /openapi.json`` → the OpenAPI 3.1 document of every route; open, as it
    reveals no task. Built per request (well under a millisecond)."""
    settings, prefix = request.app[SERVER].settings, request.app[PREFIX]
    limits = {"max_page": MAX_PAGE, "max_wait": MAX_WAIT, "max_batch": MAX_BATCH}
    return json_response(document(settings, prefix, **limits))


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` → the Prometheus exposition of this server (``metrics.py``)."""
    return await request.app[METRICS_KEY].handle(request)


def _not_ready(detail: str) -> web.Response:
    return problem(503, "Not ready", detail, headers={"Retry-After": str(READY_RETRY_AFTER)})


#: Every route: method, path, handler, name, and what it needs (``access.py``; None: open).
ROUTES: tuple[tuple[str, str, Handler, str | None, Need | None], ...] = (
    ("POST", "/tasks", create_task, "tasks", ENQUEUE),
    ("POST", "/tasks:batch", create_batch, None, ENQUEUE),
    ("POST", "/tasks:retry", admin_retry, None, ADMIN),
    ("POST", "/tasks:purge", admin_purge, None, ADMIN),
    ("POST", "/tasks/{id}/retry", retry_task, None, ADMIN),
    ("GET", "/tasks", operate.list_tasks, None, READ),
    ("POST", "/tasks:bulk", operate.bulk, None, ADMIN),
    ("GET", "/queues", operate.list_queues, "queues", READ),
    ("POST", r"/queues/{name:[\s\S]+}/pause", operate.pause_queue, None, ADMIN),
    ("POST", r"/queues/{name:[\s\S]+}/resume", operate.resume_queue, None, ADMIN),
    ("GET", "/tasks/{id}", get_task, "task", READ_TASK),
    ("DELETE", "/tasks/{id}", cancel_task, None, ADMIN),
    ("GET", "/tasks/{id}/events", task_events, "task_events", READ_TASK),
    ("GET", "/events", all_events, "events", READ),
    ("GET", "/stats", stats, "stats", READ),
    ("GET", "/healthz", healthz, "healthz", None),
    ("GET", "/readyz", readyz, "readyz", None),
    ("GET", "/metrics", metrics, "metrics", METRICS),
    ("GET", "/openapi.json", openapi_document, "openapi", None),
)


def add_routes(
    app: web.Application, server: TaskServer, prefix: str = "", hub: MercureHub | None = None
) -> Access:
    """Add every API route, under ``prefix`` (e.g. ``/jobs``; empty by default).

    Each handler is guarded by the ``Access`` this returns (``hub``'s subscriber key
    verifies Mercure tokens), its errors become problem+json (``problems.guard``),
    and every response it returns gets the Mercure hub's discovery ``Link``.
    Raises ``ConfigError`` for an unusable ``api_jwt_key``.
    """
    app[PREFIX] = prefix
    access = Access(server, prefix, hub)
    app[ACCESS] = access
    app[METRICS_KEY] = Metrics(server, hub)
    link = discovery_links(server.settings.base_url)

    def discovery(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.add("Link", link(request))

    session: list[tuple[str, Handler]] = [
        ("GET", access.session),
        ("POST", access.login),
        ("DELETE", access.logout),
    ]
    for method, handler in session:
        app.router.add_route(method, prefix + "/session", guard(handler, discovery))
    for method, path, handler, name, need in ROUTES:
        guarded = guard(handler, discovery, access.admission(need))
        app.router.add_route(method, prefix + path, guarded, name=name)
    return access
