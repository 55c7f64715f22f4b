"""Errors as ``application/problem+json`` (RFC 9457), for the routes taskserver adds.

``guard(handler)`` wraps one route's handler: any ``TaskServerError`` or aiohttp
``HTTPException`` it raises becomes a problem response naming the field at
fault, anything else a 500 whose details go to the log. It wraps taskserver's
own routes only, not a whole application: an application embedding taskserver
keeps its own error pages, and a request pays for one wrapper, where an
application middleware cost about 7 µs a request (two extra coroutine frames
and aiohttp's per-request middleware plumbing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from .errors import (
    AccessDenied,
    Conflict,
    ServerBusy,
    TaskNotFound,
    TaskServerError,
    ValidationError,
)

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Adds headers to a response before it is sent (see ``guard``).
ResponseHook = Callable[[web.Request, web.StreamResponse], None]
#: Decides whether a request may reach the handler: ``None`` when it may at once, an
#: awaitable when that must be awaited first; either way it raises to refuse.
Admission = Callable[[web.Request], Awaitable[Any] | None]


def problem_body(status: int, title: str, detail: str, field: str | None = None) -> bytes:
    """The JSON body of a problem response; ``field`` names the input at fault."""
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if field is not None:
        body["field"] = field
        body["invalid_params"] = [{"name": field, "reason": detail}]
    return orjson.dumps(body)


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An ``application/problem+json`` response; ``field`` names the input at fault."""
    return web.Response(
        body=problem_body(status, title, detail, field),
        status=status,
        headers=headers,
        content_type=PROBLEM,
    )


def as_problem(request: web.Request, exc: Exception) -> web.Response:
    """The problem response for an error a handler raised.

    An ``HTTPException`` that is not an error (a redirect) or already has a
    problem body is raised again, for aiohttp to send as it is.
    """
    if isinstance(exc, ValidationError):
        status = 422 if exc.field else 400
        return problem(status, "Invalid request", str(exc), field=exc.field)
    if isinstance(exc, TaskNotFound):
        return problem(404, "Task not found", str(exc), field="id")
    if isinstance(exc, Conflict):
        return problem(409, "Conflict", str(exc))
    if isinstance(exc, AccessDenied):
        title = {401: "Unauthorized", 421: "Misdirected Request"}.get(exc.status, "Forbidden")
        challenge = {"WWW-Authenticate": exc.challenge} if exc.challenge else None
        return problem(exc.status, title, str(exc), headers=challenge)
    if isinstance(exc, ServerBusy):
        retry = str(max(1, round(exc.retry_after)))
        return problem(503, "Service unavailable", str(exc), headers={"Retry-After": retry})
    if isinstance(exc, TaskServerError):
        return problem(500, "Internal error", str(exc))
    if isinstance(exc, web.HTTPException):
        if exc.status < 400 or exc.content_type == PROBLEM:
            raise exc
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return problem(exc.status, exc.reason, exc.text or exc.reason, headers=headers)
    # Still one shape for every failure; the details go to the log, not the client.
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return problem(500, "Internal error", "the server failed; see its log")


def guard(
    handler: Handler, decorate: ResponseHook | None = None, admit: Admission | None = None
) -> Handler:
    """``handler`` with its errors turned into problem responses.

    ``admit`` (an access check) runs first, inside the same guard: a refusal is a
    problem response too. ``decorate`` then adds headers to the response, error or
    not, unless the handler already sent it (a stream is sent at ``prepare``).
    """

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            # In this frame, not a wrapper coroutine of its own: this runs per request.
            if admit is not None and (pending := admit(request)) is not None:
                await pending
            response = await handler(request)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            response = as_problem(request, exc)
        if decorate is not None and not response.prepared:
            decorate(request, response)
        return response

    guarded.__name__ = getattr(handler, "__name__", "handler")
    guarded.__doc__ = handler.__doc__
    return guarded
