"""``GET /openapi.json``: an OpenAPI 3.1 document of every route taskserver adds.

``OPERATIONS`` is keyed by ``(method, path)`` exactly as the routes are added (the API
table of ``api.py``, the ``/session`` routes of ``access.py``, the Mercure hub of
``push/mercure.py``); a test checks the keys equal an application's routes, none missing,
none extra, so the document cannot drift from the router. The schemas and the helpers
that build operations are in ``openapi_schemas.py``. The document is open (no scope): it
describes the API and reveals no task.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any

from ..config import Settings
from ..models import EventType
from ..push.mercure import SUBSCRIPTIONS_PATH
from ..push.origins import HUB_PATH
from ..runtime.options import MAX_DELAY
from .openapi_schemas import (
    BULK,
    BULK_RESULT,
    ID,
    JSON,
    JSON_BODY,
    LAST_EVENT_ID,
    LINKS,
    NAME_SCHEMA,
    NEW_TASK,
    OPTION_SCHEMAS,
    PAGE,
    QUEUE,
    QUEUE_NAME,
    SCHEMAS,
    STREAM,
    TRUE,
    Op,
    json_ok,
    nullable,
    operation,
    problem_responses,
    query_param,
    ref,
    request_body,
)


def _api(max_page: int, max_wait: int, max_batch: int) -> dict[tuple[str, str], Op]:
    task = json_ok(ref("TaskWithLinks"))
    batch_item = {"type": "object", "properties": {"id": {"type": "integer"}, **LINKS}}
    return {
        ("POST", "/tasks"): operation(
            "Enqueue a task",
            "enqueue",
            {
                "202": json_ok(ref("Created"), "queued"),
                "200": json_ok(ref("Created"), "a task already holds its unique_key"),
                **problem_responses(*JSON_BODY, 503),
            },
            requestBody=request_body(ref("NewTask")),
        ),
        ("POST", "/tasks:batch"): operation(
            "Enqueue many tasks, all or none",
            "enqueue",
            {
                "202": json_ok({"type": "object", "properties": {"tasks": {"items": batch_item}}}),
                **problem_responses(*JSON_BODY, 503),
            },
            requestBody=request_body(
                {
                    "type": "object",
                    "required": ["tasks"],
                    "additionalProperties": False,
                    "properties": {
                        "tasks": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": max_batch,
                            "items": ref("NewTask"),
                        }
                    },
                }
            ),
        ),
        ("POST", "/tasks:retry"): operation(
            "Re-queue tasks by id, or every failed one",
            "admin",
            {
                "200": json_ok(
                    {
                        "type": "object",
                        "required": ["retried", "errors"],
                        "properties": {
                            "retried": {"type": "array", "items": {"type": "integer"}},
                            "errors": {"type": "object"},
                        },
                    }
                ),
                **problem_responses(*JSON_BODY),
            },
            requestBody=request_body(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "ids": {
                            "type": "array",
                            "items": {"type": "integer", "minimum": 1, "maximum": 2**62 - 1},
                        },
                        "failed": {"type": "boolean"},
                    },
                    # ids, or failed: true; not both.
                    "anyOf": [
                        {
                            "required": ["ids"],
                            "not": {"required": ["failed"], "properties": {"failed": TRUE}},
                        },
                        {
                            "required": ["failed"],
                            "properties": {"failed": TRUE},
                            "not": {"required": ["ids"]},
                        },
                    ],
                }
            ),
        ),
        ("POST", "/tasks:purge"): operation(
            "Delete ended tasks older than older_than seconds",
            "admin",
            {
                "200": json_ok({"type": "object", "properties": {"purged": {"type": "integer"}}}),
                **problem_responses(*JSON_BODY),
            },
            requestBody=request_body(
                {
                    "type": "object",
                    "required": ["older_than"],
                    "additionalProperties": False,
                    "properties": {
                        "older_than": {"type": "number", "minimum": 0},
                        "states": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"enum": ["succeeded", "failed", "cancelled"]},
                        },
                    },
                }
            ),
        ),
        ("POST", "/tasks/{id}/retry"): operation(
            "Re-queue a failed or cancelled task",
            "admin",
            {"200": task, **problem_responses(404, 409)},
            parameters=[ID],
        ),
        ("GET", "/tasks"): operation(
            "One page of tasks and the cursor to the next",
            "read",
            {"200": json_ok(PAGE), **problem_responses(422)},
            parameters=[
                query_param("state", ref("TaskState")),
                query_param("queue", NAME_SCHEMA, "only tasks of this queue"),
                query_param("name", NAME_SCHEMA, "only tasks with this name"),
                query_param("unique_key", NAME_SCHEMA, "only tasks with this unique_key"),
                query_param("limit", {"type": "integer", "minimum": 1, "maximum": max_page}),
                query_param("order", {"enum": ["asc", "desc"]}),
                query_param("after", {"type": "integer", "minimum": 0, "maximum": 2**62}),
                query_param("before", {"type": "integer", "minimum": 1, "maximum": 2**62}),
            ],
        ),
        ("GET", "/tasks/{id}"): operation(
            "One task; wait long-polls until it ends",
            "read",
            {"200": task, **problem_responses(404, 422)},
            parameters=[
                ID,
                query_param(
                    "wait", {"type": "integer", "minimum": 0, "maximum": max_wait}, "seconds"
                ),
            ],
        ),
        ("DELETE", "/tasks/{id}"): operation(
            "Cancel a task", "admin", {"200": task, **problem_responses(404, 409)}, parameters=[ID]
        ),
        ("GET", "/tasks/{id}/events"): operation(
            "The task's events (SSE) until its last; event names: "
            + ", ".join(e.value for e in EventType),
            "read",
            {"200": STREAM, "204": {"description": "the task ended before Last-Event-ID"}}
            | problem_responses(404, 422),
            parameters=[ID, *LAST_EVENT_ID],
        ),
        ("GET", "/events"): operation(
            "Every task event (SSE); resumes after Last-Event-ID",
            "read",
            {"200": STREAM, **problem_responses(422)},
            parameters=LAST_EVENT_ID,
        ),
        ("GET", "/stats"): operation(
            "Worker and task counters, the hour's history, tasks per queue",
            "read",
            {"200": json_ok({"type": "object"}), **problem_responses(422)},
            parameters=[
                query_param(
                    "queues",
                    {"enum": ["true", "false"]},
                    "false: per-queue counts from memory only, no count over the store",
                )
            ],
        ),
        ("POST", "/tasks:bulk"): operation(
            "Retry, cancel or purge a selection (ids) or what a filter matches, in pages",
            "admin",
            {"200": json_ok(BULK_RESULT), **problem_responses(*JSON_BODY, 503)},
            requestBody=request_body(BULK),
        ),
        ("GET", "/queues"): operation(
            "Every queue: counts, running, concurrency, priority, paused",
            "read",
            {
                "200": json_ok(
                    {
                        "type": "object",
                        "required": ["queues"],
                        "properties": {"queues": {"type": "array", "items": QUEUE}},
                    }
                )
            },
        ),
        ("POST", "/queues/{name}/pause"): operation(
            "Pause a queue: it takes tasks and starts none, across restarts",
            "admin",
            {"200": json_ok(QUEUE), **problem_responses(404, 422, 503)},
            parameters=[QUEUE_NAME],
        ),
        ("POST", "/queues/{name}/resume"): operation(
            "Resume a paused queue",
            "admin",
            {"200": json_ok(QUEUE), **problem_responses(404, 422, 503)},
            parameters=[QUEUE_NAME],
        ),
        ("GET", "/healthz"): operation("Liveness", None, {"200": json_ok(ref("Status"))}),
        ("GET", "/metrics"): operation(
            "Prometheus metrics (text exposition; OpenMetrics on Accept)",
            "metrics",
            {
                "200": {
                    "description": "the exposition",
                    "content": {"text/plain": {}, "application/openmetrics-text": {}},
                }
            },
        ),
        ("GET", "/readyz"): operation(
            "Readiness: 503 while draining or the store cannot write",
            None,
            {"200": json_ok(ref("Status")), **problem_responses(503)},
        ),
        ("GET", "/openapi.json"): operation(
            "This document", None, {"200": json_ok({"type": "object"})}
        ),
    }


SESSION = {
    "type": "object",
    "required": ["required", "authenticated", "scopes"],
    "properties": {
        "required": {"type": "boolean"},
        "authenticated": {"type": "boolean"},
        "name": {"type": "string"},
        "scopes": {"type": "array", "items": {"type": "string"}},
    },
}
LOGIN = {"type": "object", "properties": {"token": {"type": "string", "minLength": 1}}}


def _session() -> dict[tuple[str, str], Op]:
    return {
        ("GET", "/session"): operation("Who this request is", None, {"200": json_ok(SESSION)}),
        ("POST", "/session"): operation(
            "Log in: check the token, keep it in the HttpOnly cookie (needs Origin)",
            None,
            {"200": json_ok({"type": "object"}), **problem_responses(400, 401, 403, 422)},
            requestBody={
                "required": True,
                "content": {JSON: {"schema": LOGIN}, FORM_MEDIA: {"schema": LOGIN}},
            },
        ),
        ("DELETE", "/session"): operation(
            "Log out", None, {"204": {"description": "cookie cleared"}}
        ),
    }


FORM_MEDIA = "application/x-www-form-urlencoded"
HUB_SECURITY: list[dict[str, list[str]]] = [{"mercure": []}]


def _hub(subscriptions: bool) -> dict[tuple[str, str], Op]:
    hub_problems = problem_responses(400, 401, 403)
    preflight: Op = {
        "summary": "CORS preflight",
        "security": [],
        "responses": {"204": {"description": "CORS headers"}},
    }
    publish = {
        "type": "object",
        "required": ["topic"],
        "properties": {
            "topic": {"type": "array", "items": {"type": "string"}},
            "data": {"type": "string"},
            "private": {"type": "string"},
            "id": {"type": "string"},
            "type": {"type": "string"},
            "retry": {"type": "string"},
        },
    }
    ops: dict[tuple[str, str], Op] = {
        ("GET", HUB_PATH): {
            "summary": "Mercure subscribe (SSE)",
            "security": HUB_SECURITY,
            "parameters": [
                {
                    "name": "topic",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "array", "items": {"type": "string"}},
                },
                *LAST_EVENT_ID,
            ],
            "responses": {"200": STREAM, **hub_problems, **problem_responses(503)},
        },
        ("POST", HUB_PATH): {
            "summary": "Mercure publish; answers the update's id",
            "security": HUB_SECURITY,
            "requestBody": request_body(publish, FORM_MEDIA),
            "responses": {
                "200": {"description": "its id", "content": {"text/plain": {}}},
                **hub_problems,
                **problem_responses(415, 503),
            },
        },
        ("OPTIONS", HUB_PATH): preflight,
    }
    if subscriptions:
        topic = {"name": "topic", "in": "path", "required": True, "schema": {"type": "string"}}
        who = {"name": "subscriber", "in": "path", "required": True, "schema": {"type": "string"}}
        listing = {"description": "JSON-LD", "content": {"application/ld+json": {}}}
        for path, params in (
            (SUBSCRIPTIONS_PATH, []),
            (SUBSCRIPTIONS_PATH + "/{topic}", [topic]),
            (SUBSCRIPTIONS_PATH + "/{topic}/{subscriber}", [topic, who]),
        ):
            codes = (401, 403, 404) if "subscriber" in path else (401, 403)
            ops[("GET", path)] = {
                "summary": "Mercure subscriptions API",
                "security": HUB_SECURITY,
                "parameters": params,
                "responses": {"200": listing, **problem_responses(*codes)},
            }
            ops[("OPTIONS", path)] = {**preflight, "parameters": params}
    return ops


def _new_task(now: float) -> dict[str, Any]:
    """``NEW_TASK`` with ``available_at``'s bound as of ``now``."""
    props = dict(NEW_TASK["properties"])
    props["available_at"] = nullable(
        {**OPTION_SCHEMAS["available_at"], "maximum": math.floor(now + MAX_DELAY)}
    )
    return {**NEW_TASK, "properties": props}


def operations(
    settings: Settings, *, max_page: int = 1000, max_wait: int = 60, max_batch: int = 10_000
) -> dict[tuple[str, str], Op]:
    """Every route an application gets from ``attach``, keyed ``(method, path)``.

    The limits are ``api``'s (it passes them; a test checks the defaults agree).
    """
    ops = _api(max_page, max_wait, max_batch)
    return {**ops, **_session(), **_hub(settings.mercure_subscriptions)}


def document(settings: Settings, prefix: str = "", **limits: int) -> dict[str, Any]:
    """The OpenAPI 3.1 document; API paths under ``prefix``, the hub's at the root.

    ``limits``: ``max_page``, ``max_wait``, ``max_batch`` as for ``operations``.
    """
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in operations(settings, **limits).items():
        full = path if path.startswith(HUB_PATH) else prefix + path
        paths.setdefault(full, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "taskserver", "version": _version()},
        "servers": [{"url": settings.base_url or "/"}],
        "paths": paths,
        "components": {
            "schemas": {**SCHEMAS, "NewTask": _new_task(time.time())},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "api_token, [api_tokens.NAME] (scopes read, enqueue, "
                    "metrics, admin; admin implies the others) or a JWT; open when none is"
                    " configured",
                },
                "cookie": {"type": "apiKey", "in": "cookie", "name": "taskserver_token"},
                "mercure": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
        },
    }


def _version() -> str:
    try:
        return importlib.metadata.version("taskserver")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a bare tree
        return "unknown"
