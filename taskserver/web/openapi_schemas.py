"""The pieces of the OpenAPI document (``openapi.py``): JSON schemas of the bodies, the
task options (from ``runtime/options.py``'s limits), the problem responses, and the
helpers that build parameters, bodies and operations."""

from __future__ import annotations

from typing import Any

from ..models import TaskState
from ..runtime.options import LABEL, MAX_DELAY

PROBLEM = "application/problem+json"
JSON = "application/json"
SSE = "text/event-stream"

Op = dict[str, Any]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
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
        **{k: nullable(v) for k, v in OPTION_SCHEMAS.items()},
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
    "state": ref("TaskState"),
    "name": nullable({"type": "string"}),
    "queue": {"type": "string"},
    "priority": {"type": "integer"},
    "serial_group": nullable({"type": "string"}),
    "unique_key": nullable({"type": "string"}),
    "data": {},
    "attempts": {"type": "integer", "minimum": 0},
    "max_attempts": {"type": "integer"},
    "timeout": nullable({"type": "number"}),
    "progress": nullable({"type": "number"}),
    "message": nullable({"type": "string"}),
    "result": {},
    "error": nullable({"type": "string"}),
    "traceback": nullable({"type": "string"}),
    "finish_error": nullable({"type": "string"}),
    "hook_error": nullable({"type": "string"}),
    "retry": nullable({"type": "object"}),
    "created_at": TIME,
    "available_at": TIME,
    "started_at": nullable(TIME),
    "finished_at": nullable(TIME),
    "updated_at": TIME,
}
LINKS = {
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
        "allOf": [ref("Task"), {"type": "object", "required": list(LINKS), "properties": LINKS}]
    },
    "Created": {
        "type": "object",
        "required": ["id", "state", "existing", *LINKS],
        "properties": {
            "id": {"type": "integer"},
            "state": ref("TaskState"),
            "existing": {"type": "boolean", "description": "a task held its unique_key"},
            **LINKS,
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


def problem_responses(*codes: int) -> dict[str, Any]:
    return {
        str(code): {
            "description": _PROBLEMS[code],
            "content": {PROBLEM: {"schema": ref("Problem")}},
        }
        for code in codes
    }


def json_ok(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def request_body(schema: dict[str, Any], media: str = JSON) -> dict[str, Any]:
    return {"required": True, "content": {media: {"schema": schema}}}


def query_param(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1}}
LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]*$"}},
    query_param("lastEventID", {"type": "string", "pattern": "^[0-9]*$"}, "as Last-Event-ID"),
]
STREAM = {"description": "an event stream", "content": {SSE: {"schema": {"type": "string"}}}}
JSON_BODY = (400, 413, 415, 422)
PAGE = {
    "type": "object",
    "required": ["tasks", "next"],
    "properties": {
        "tasks": {"type": "array", "items": ref("Task")},
        "next_after": nullable({"type": "integer"}),
        "next_before": nullable({"type": "integer"}),
        "next": nullable({"type": "string", "description": "the next page's URL"}),
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
        "concurrency": nullable({"type": "integer"}),
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
            "properties": {"state": ref("TaskState"), "queue": NAME_SCHEMA, "name": NAME_SCHEMA},
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
        "next_after": nullable({"type": "integer"}),
    },
}


def operation(
    summary: str, scope: str | None, responses: dict[str, Any], **more: Any
) -> dict[str, Any]:
    """One operation; ``scope`` (read, enqueue, metrics, admin) adds the 401/403 it may
    answer."""
    op: dict[str, Any] = {"summary": summary, "responses": responses, **more}
    if scope is None:
        op["security"] = []
    else:
        op["security"] = [{"bearer": [scope]}, {"cookie": [scope]}]
        responses.update(problem_responses(401, 403))
    return op
