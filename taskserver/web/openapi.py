"""``GET /openapi.json``: an OpenAPI 3.1 document of every route taskserver adds.

``OPERATIONS`` is keyed by ``(method, path)`` exactly as the routes are added (the API
table of ``api.py``, the ``/session`` routes of ``access.py``, the Mercure hub of
``push/mercure.py``); a test checks the keys equal an application's routes, none missing,
none extra, so the document cannot drift from the router. Task options come from
``runtime/options.py``'s limits. The document is open (no scope): it describes the API and
reveals no task.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from typing import Any

from ..config import Settings
from ..models import EventType, TaskState
from ..push.mercure import HUB_PATH, SUBSCRIPTIONS_PATH
from ..runtime.options import LABEL, MAX_DELAY

PROBLEM = "application/problem+json"
JSON = "application/json"
SSE = "text/event-stream"

Op = dict[str, Any]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


LABEL_SCHEMA = {"type": "string", "pattern": LABEL.pattern}
TRUE = {"const": True}
SECONDS = {"type": "number", "minimum": 0, "maximum": MAX_DELAY}
TIME = {"type": "number", "description": "seconds since the Unix epoch"}

#: What a task may carry besides ``data`` (``options.prepare`` checks the same).
OPTION_SCHEMAS: dict[str, dict[str, Any]] = {
    "name": {**LABEL_SCHEMA, "description": "the task's name: picks its defaults"},
    "queue": {**LABEL_SCHEMA, "description": "its queue (default: default)"},
    "priority": {"type": "integer", "minimum": -1000, "maximum": 1000},
    "delay": {**SECONDS, "description": "start no sooner than this many seconds from now"},
    "available_at": {
        "type": "number",
        "minimum": 0,
        "description": "start no sooner than this time (epoch seconds; at most 10 years ahead: "
        "maximum is now + 10 years when the document was built)",
    },
    "serial_group": {**LABEL_SCHEMA, "description": "tasks of a group run one at a time"},
    "unique_key": {**LABEL_SCHEMA, "description": "while one task holds it, enqueue returns it"},
    "unique_for": {**SECONDS, "description": "hold unique_key this long after the task ends"},
    "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DELAY},
    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
    "retry": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "base": SECONDS,
            "factor": {"type": "number", "minimum": 1, "maximum": 100},
            "cap": SECONDS,
            "jitter": {"type": "number", "minimum": 0, "maximum": 1},
        },
    },
}

NUMBER = {"type": "number"}
NEW_TASK: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "additionalProperties": False,
    # null: not set (the defaults apply).
    "properties": {
        "data": {"description": "any JSON value"},
        **{k: _nullable(v) for k, v in OPTION_SCHEMAS.items()},
    },
    # delay and available_at exclude each other; unique_for needs a unique_key.
    "not": {
        "required": ["delay", "available_at"],
        "properties": {"delay": NUMBER, "available_at": NUMBER},
    },
    "if": {"required": ["unique_for"], "properties": {"unique_for": NUMBER}},
    "then": {"required": ["unique_key"], "properties": {"unique_key": {"type": "string"}}},
}

_TASK_PROPS: dict[str, Any] = {
    "id": {"type": "integer", "minimum": 1},
    "state": _ref("TaskState"),
    "name": _nullable({"type": "string"}),
    "queue": {"type": "string"},
    "priority": {"type": "integer"},
    "serial_group": _nullable({"type": "string"}),
    "unique_key": _nullable({"type": "string"}),
    "data": {},
    "attempts": {"type": "integer", "minimum": 0},
    "max_attempts": {"type": "integer"},
    "timeout": _nullable({"type": "number"}),
    "progress": _nullable({"type": "number"}),
    "message": _nullable({"type": "string"}),
    "result": {},
    "error": _nullable({"type": "string"}),
    "traceback": _nullable({"type": "string"}),
    "finish_error": _nullable({"type": "string"}),
    "hook_error": _nullable({"type": "string"}),
    "retry": _nullable({"type": "object"}),
    "created_at": TIME,
    "available_at": TIME,
    "started_at": _nullable(TIME),
    "finished_at": _nullable(TIME),
    "updated_at": TIME,
}
_LINKS = {
    "url": {"type": "string"},
    "events_url": {"type": "string"},
    "topic": {"type": "string"},
}

SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details; field names the input at fault",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "field": {"type": "string"},
            "invalid_params": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "reason"],
                    "properties": {"name": {"type": "string"}, "reason": {"type": "string"}},
                },
            },
        },
    },
    "TaskState": {"type": "string", "enum": [s.value for s in TaskState]},
    "NewTask": NEW_TASK,
    "Task": {"type": "object", "required": list(_TASK_PROPS), "properties": _TASK_PROPS},
    "TaskWithLinks": {
        "allOf": [_ref("Task"), {"type": "object", "required": list(_LINKS), "properties": _LINKS}]
    },
    "Created": {
        "type": "object",
        "required": ["id", "state", "existing", *_LINKS],
        "properties": {
            "id": {"type": "integer"},
            "state": _ref("TaskState"),
            "existing": {"type": "boolean", "description": "a task held its unique_key"},
            **_LINKS,
        },
    },
    "Status": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    },
}

_PROBLEMS = {
    400: "the request is malformed",
    401: "no valid credential (WWW-Authenticate: Bearer)",
    403: "the credential lacks the scope, or a write from another Origin",
    404: "no such task or route",
    409: "the task's state does not allow it",
    413: "the body is larger than max_body_bytes",
    415: "the body is not JSON",
    422: "a field is invalid; field names it",
    503: "the server is busy or stopping (Retry-After)",
}


def _problems(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _PROBLEMS[code],
            "content": {PROBLEM: {"schema": _ref("Problem")}},
        }
        for code in codes
    }


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _body(schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    return {"required": True, "content": {media: {"schema": schema}}}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]*$"}},
    _query("lastEventID", {"type": "string", "pattern": "^[0-9]*$"}, "as Last-Event-ID"),
]
STREAM = {"description": "an event stream", "content": {SSE: {"schema": {"type": "string"}}}}
JSON_BODY = (400, 413, 415, 422)
PAGE = {
    "type": "object",
    "required": ["tasks", "next"],
    "properties": {
        "tasks": {"type": "array", "items": _ref("Task")},
        "next_after": _nullable({"type": "integer"}),
        "next_before": _nullable({"type": "integer"}),
        "next": _nullable({"type": "string", "description": "the next page's URL"}),
    },
}
#: A queue, name or unique key to match exactly (``operate.py``): any 1-200 characters.
NAME_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 200}
QUEUE_NAME = {"name": "name", "in": "path", "required": True, "schema": NAME_SCHEMA}
COUNT = {"type": "integer", "minimum": 0}
QUEUE = {
    "type": "object",
    "required": ["name", "queued", "waiting", "running", "retrying", "paused"],
    "properties": {
        "name": {"type": "string"},
        "queued": COUNT,
        "waiting": COUNT,
        "running": COUNT,
        "retrying": COUNT,
        "paused": {"type": "boolean"},
        "concurrency": _nullable({"type": "integer"}),
        "priority": {"type": "integer"},
    },
}
BULK = {
    "type": "object",
    "required": ["action"],
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["retry", "cancel", "purge"]},
        "ids": {
            "type": "array",
            "maxItems": 10_000,
            "items": {"type": "integer", "minimum": 1, "maximum": 2**62 - 1},
        },
        "filter": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"state": _ref("TaskState"), "queue": NAME_SCHEMA, "name": NAME_SCHEMA},
        },
        "limit": {"type": "integer", "minimum": 1, "maximum": 100_000},
        "after": {"type": "integer", "minimum": 0, "maximum": 2**62},
    },
    # A purge deletes ended tasks only: a filter's state must be one of them.
    "if": {
        "required": ["action", "filter"],
        "properties": {"action": {"const": "purge"}, "filter": {"required": ["state"]}},
    },
    "then": {
        "properties": {
            "filter": {"properties": {"state": {"enum": ["succeeded", "failed", "cancelled"]}}}
        }
    },
    # ids, or a filter (with limit and after); not both.
    "oneOf": [
        {
            "required": ["ids"],
            "not": {
                "anyOf": [
                    {"required": ["filter"]},
                    {"required": ["limit"]},
                    {"required": ["after"]},
                ]
            },
        },
        {"required": ["filter"], "not": {"required": ["ids"]}},
    ],
}
BULK_RESULT = {
    "type": "object",
    "required": ["action", "matched", "done", "errors", "next_after"],
    "properties": {
        "action": {"type": "string"},
        "matched": COUNT,
        "done": COUNT,
        "errors": {"type": "object", "additionalProperties": {"type": "string"}},
        "next_after": _nullable({"type": "integer"}),
    },
}


def _op(summary: str, scope: str | None, responses: dict[str, Any], **more: Any) -> dict[str, Any]:
    """One operation; ``scope`` (read, enqueue, metrics, admin) adds the 401/403 it may
    answer."""
    op: dict[str, Any] = {"summary": summary, "responses": responses, **more}
    if scope is None:
        op["security"] = []
    else:
        op["security"] = [{"bearer": [scope]}, {"cookie": [scope]}]
        responses.update(_problems(401, 403))
    return op


def _api(max_page: int, max_wait: int, max_batch: int) -> dict[tuple[str, str], Op]:
    task = _json(_ref("TaskWithLinks"))
    batch_item = {"type": "object", "properties": {"id": {"type": "integer"}, **_LINKS}}
    return {
        ("POST", "/tasks"): _op(
            "Enqueue a task",
            "enqueue",
            {
                "202": _json(_ref("Created"), "queued"),
                "200": _json(_ref("Created"), "a task already holds its unique_key"),
                **_problems(*JSON_BODY, 503),
            },
            requestBody=_body(_ref("NewTask")),
        ),
        ("POST", "/tasks:batch"): _op(
            "Enqueue many tasks, all or none",
            "enqueue",
            {
                "202": _json({"type": "object", "properties": {"tasks": {"items": batch_item}}}),
                **_problems(*JSON_BODY, 503),
            },
            requestBody=_body(
                {
                    "type": "object",
                    "required": ["tasks"],
                    "additionalProperties": False,
                    "properties": {
                        "tasks": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": max_batch,
                            "items": _ref("NewTask"),
                        }
                    },
                }
            ),
        ),
        ("POST", "/tasks:retry"): _op(
            "Re-queue tasks by id, or every failed one",
            "admin",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["retried", "errors"],
                        "properties": {
                            "retried": {"type": "array", "items": {"type": "integer"}},
                            "errors": {"type": "object"},
                        },
                    }
                ),
                **_problems(*JSON_BODY),
            },
            requestBody=_body(
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
        ("POST", "/tasks:purge"): _op(
            "Delete ended tasks older than older_than seconds",
            "admin",
            {
                "200": _json({"type": "object", "properties": {"purged": {"type": "integer"}}}),
                **_problems(*JSON_BODY),
            },
            requestBody=_body(
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
        ("POST", "/tasks/{id}/retry"): _op(
            "Re-queue a failed or cancelled task",
            "admin",
            {"200": task, **_problems(404, 409)},
            parameters=[ID],
        ),
        ("GET", "/tasks"): _op(
            "One page of tasks and the cursor to the next",
            "read",
            {"200": _json(PAGE), **_problems(422)},
            parameters=[
                _query("state", _ref("TaskState")),
                _query("queue", NAME_SCHEMA, "only tasks of this queue"),
                _query("name", NAME_SCHEMA, "only tasks with this name"),
                _query("unique_key", NAME_SCHEMA, "only tasks with this unique_key"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": max_page}),
                _query("order", {"enum": ["asc", "desc"]}),
                _query("after", {"type": "integer", "minimum": 0, "maximum": 2**62}),
                _query("before", {"type": "integer", "minimum": 1, "maximum": 2**62}),
            ],
        ),
        ("GET", "/tasks/{id}"): _op(
            "One task; wait long-polls until it ends",
            "read",
            {"200": task, **_problems(404, 422)},
            parameters=[
                ID,
                _query("wait", {"type": "integer", "minimum": 0, "maximum": max_wait}, "seconds"),
            ],
        ),
        ("DELETE", "/tasks/{id}"): _op(
            "Cancel a task", "admin", {"200": task, **_problems(404, 409)}, parameters=[ID]
        ),
        ("GET", "/tasks/{id}/events"): _op(
            "The task's events (SSE) until its last; event names: "
            + ", ".join(e.value for e in EventType),
            "read",
            {"200": STREAM, "204": {"description": "the task ended before Last-Event-ID"}}
            | _problems(404, 422),
            parameters=[ID, *LAST_EVENT_ID],
        ),
        ("GET", "/events"): _op(
            "Every task event (SSE); resumes after Last-Event-ID",
            "read",
            {"200": STREAM, **_problems(422)},
            parameters=LAST_EVENT_ID,
        ),
        ("GET", "/stats"): _op(
            "Worker and task counters, the hour's history, tasks per queue",
            "read",
            {"200": _json({"type": "object"}), **_problems(422)},
            parameters=[
                _query(
                    "queues",
                    {"enum": ["true", "false"]},
                    "false: per-queue counts from memory only, no count over the store",
                )
            ],
        ),
        ("POST", "/tasks:bulk"): _op(
            "Retry, cancel or purge a selection (ids) or what a filter matches, in pages",
            "admin",
            {"200": _json(BULK_RESULT), **_problems(*JSON_BODY, 503)},
            requestBody=_body(BULK),
        ),
        ("GET", "/queues"): _op(
            "Every queue: counts, running, concurrency, priority, paused",
            "read",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["queues"],
                        "properties": {"queues": {"type": "array", "items": QUEUE}},
                    }
                )
            },
        ),
        ("POST", "/queues/{name}/pause"): _op(
            "Pause a queue: it takes tasks and starts none, across restarts",
            "admin",
            {"200": _json(QUEUE), **_problems(404, 422, 503)},
            parameters=[QUEUE_NAME],
        ),
        ("POST", "/queues/{name}/resume"): _op(
            "Resume a paused queue",
            "admin",
            {"200": _json(QUEUE), **_problems(404, 422, 503)},
            parameters=[QUEUE_NAME],
        ),
        ("GET", "/healthz"): _op("Liveness", None, {"200": _json(_ref("Status"))}),
        ("GET", "/metrics"): _op(
            "Prometheus metrics (text exposition; OpenMetrics on Accept)",
            "metrics",
            {
                "200": {
                    "description": "the exposition",
                    "content": {"text/plain": {}, "application/openmetrics-text": {}},
                }
            },
        ),
        ("GET", "/readyz"): _op(
            "Readiness: 503 while draining or the store cannot write",
            None,
            {"200": _json(_ref("Status")), **_problems(503)},
        ),
        ("GET", "/openapi.json"): _op("This document", None, {"200": _json({"type": "object"})}),
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
        ("GET", "/session"): _op("Who this request is", None, {"200": _json(SESSION)}),
        ("POST", "/session"): _op(
            "Log in: check the token, keep it in the HttpOnly cookie (needs Origin)",
            None,
            {"200": _json({"type": "object"}), **_problems(400, 401, 403, 422)},
            requestBody={
                "required": True,
                "content": {JSON: {"schema": LOGIN}, FORM_MEDIA: {"schema": LOGIN}},
            },
        ),
        ("DELETE", "/session"): _op("Log out", None, {"204": {"description": "cookie cleared"}}),
    }


FORM_MEDIA = "application/x-www-form-urlencoded"
HUB_SECURITY: list[dict[str, list[str]]] = [{"mercure": []}]


def _hub(subscriptions: bool) -> dict[tuple[str, str], Op]:
    hub_problems = _problems(400, 401, 403)
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
            "responses": {"200": STREAM, **hub_problems, **_problems(503)},
        },
        ("POST", HUB_PATH): {
            "summary": "Mercure publish; answers the update's id",
            "security": HUB_SECURITY,
            "requestBody": _body(publish, FORM_MEDIA),
            "responses": {
                "200": {"description": "its id", "content": {"text/plain": {}}},
                **hub_problems,
                **_problems(415, 503),
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
                "responses": {"200": listing, **_problems(*codes)},
            }
            ops[("OPTIONS", path)] = {**preflight, "parameters": params}
    return ops


def _new_task(now: float) -> dict[str, Any]:
    """``NEW_TASK`` with ``available_at``'s bound as of ``now``."""
    props = dict(NEW_TASK["properties"])
    props["available_at"] = _nullable(
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
