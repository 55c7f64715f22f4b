"""What the API's handlers share: the application keys, JSON in and out, parameters.

Every handler module (``api``, ``operate``) builds on these; none of them knows a route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from ..errors import ValidationError
from ..models import TaskState
from ..server import TaskServer
from .access import Access
from .jsonints import refuse_wide_integers

SERVER: web.AppKey[TaskServer] = web.AppKey("taskserver", TaskServer)
#: The prefix the API routes were mounted under (``add_routes``).
PREFIX: web.AppKey[str] = web.AppKey("taskserver_prefix", str)
#: Who may use the routes (``access.py``).
ACCESS: web.AppKey[Access] = web.AppKey("taskserver_access", Access)

JSON = "application/json"
MAX_PAGE = 1000
DEFAULT_PAGE = 100
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    # The header given as is: aiohttp's content_type argument parses and rebuilds it.
    if headers is None:
        headers = {"Content-Type": JSON}
    else:
        headers["Content-Type"] = JSON
    return web.Response(body=orjson.dumps(body), status=status, headers=headers)


async def read_json_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The request body as a JSON object with only ``allowed`` keys, or a 4xx."""
    # The exact header first: parsing it (content_type) costs more than the comparison.
    if request.headers.get("Content-Type") != JSON and request.content_type != JSON:
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type must be {JSON}, got {request.content_type or 'none'}"
        )
    raw = buffered_body(request)
    if raw is None:
        raw = await request.read()  # client_max_size bounds it (413 past the limit)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValidationError(f"the body is not valid JSON: {exc}") from None
    refuse_wide_integers(raw)
    if not isinstance(body, dict):
        raise ValidationError("the body must be a JSON object", field="body")
    for key in body:
        if key not in allowed:
            raise ValidationError(
                f"unknown field {key!r}; allowed: {', '.join(sorted(allowed))}", field=key
            )
    return body


def buffered_body(request: web.Request) -> bytes | None:
    """The whole body when it has all arrived and nothing has read it, else ``None``
    (then ``request.read()``); bounded by ``client_max_size`` as ``read()`` is (413).

    A small POST arrives with its head: taking it from the buffer saves ``read()``'s
    three coroutines and two copies, about 1 us a request.
    """
    content = request.content
    if not content.is_eof() or content.at_eof():
        return None  # still coming, or already read (read() has kept it) or empty
    raw = content.read_nowait()  # raises what the stream failed with, as read() does
    limit = request.client_max_size
    if limit and len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(limit, len(raw))
    return raw


def query_param(request: web.Request, name: str) -> str | None:
    """A query parameter that is given at most once: its value, ``None`` when absent.

    Given twice (``?limit=1&limit=500``) it is a 422 naming it: which one counts would
    be a guess, and a proxy or a client library may pick the other one.
    """
    values = request.query.getall(name, ())
    if not values:
        return None
    if len(values) > 1:
        raise ValidationError(f"{name} must be given once, got {len(values)} values", field=name)
    return values[0]


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    """An integer query parameter within [lo, hi], or 422 naming it."""
    raw = query_param(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {raw!r}", field=name) from None
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be from {lo} to {hi}, got {value}", field=name)
    return value


def is_id(value: Any) -> bool:
    """A task id in JSON: a positive integer."""
    # type() and not isinstance(): JSON true is a bool, and bool is an int in Python.
    return type(value) is int and 0 < value < 2**62


def state_param(request: web.Request, name: str = "state") -> TaskState | None:
    """A task state query parameter, or 422 naming it; ``None`` when absent."""
    raw = query_param(request, name)
    if raw is None:
        return None
    try:
        return TaskState(raw)
    except ValueError:
        raise ValidationError(
            f"{name} must be one of {', '.join(s.value for s in TaskState)}, got {raw!r}",
            field=name,
        ) from None
