"""Routes for operating a server: finding tasks, queues (pause, resume), bulk actions.

Handlers parse, call one ``TaskServer`` method and serialise, as in ``api.py``; a bad
query parameter or body field is a 422 problem naming it. Queue names, task names and
unique keys given here are exact matches: any string of 1-200 characters is accepted
(one no task has matches nothing), so the API document can state exactly what is.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import ValidationError
from ..models import TaskState
from ..runtime.bulk import Where, check_action
from .http import (
    DEFAULT_PAGE,
    MAX_PAGE,
    SERVER,
    int_param,
    is_id,
    json_response,
    query_param,
    read_json_object,
    state_param,
)

#: Most tasks one filter-based ``POST /tasks:bulk`` acts on (it returns a cursor).
MAX_BULK = 100_000
DEFAULT_BULK = 10_000
#: Most ids one ``POST /tasks:bulk`` may name.
MAX_BULK_IDS = 10_000
FILTER_FIELDS = frozenset({"state", "queue", "name"})
CURSOR_MAX = 2**62
#: Longest queue, name or unique key (``runtime/options.py``'s labels).
MAX_LABEL = 200


def text_param(request: web.Request, name: str) -> str | None:
    """A queue, name or unique-key query parameter: an exact match, 1-200 characters
    (no task has another), or 422 naming it."""
    raw = query_param(request, name)
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_LABEL:
        raise ValidationError(f"{name} must be 1-{MAX_LABEL} characters", field=name)
    return raw


async def list_tasks(request: web.Request) -> web.Response:
    """``GET /tasks?state=&queue=&name=&unique_key=&limit=&after=`` (or ``order=desc&before=``)
    → one page and the cursor to the next (``next`` is its URL; null on the last page)."""
    server = request.app[SERVER]
    state = state_param(request)
    queue, name = text_param(request, "queue"), text_param(request, "name")
    unique_key = text_param(request, "unique_key")
    limit = int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
    order = query_param(request, "order")
    if order is None:
        order = "asc"
    if order not in ("asc", "desc"):
        raise ValidationError(f"order must be asc or desc, got {order!r}", field="order")
    cursor = "after" if order == "asc" else "before"
    # Both checked whatever the order: a bad value is refused, not silently ignored.
    after = int_param(request, "after", 0, 0, CURSOR_MAX)
    before: int | None = int_param(request, "before", CURSOR_MAX, 1, CURSOR_MAX)
    if order == "asc":
        before = None
    else:
        after = 0
    tasks = await server.list_tasks(
        state=state,
        after=after,
        limit=limit,
        before=before,
        queue=queue,
        name=name,
        unique_key=unique_key,
    )
    next_cursor = tasks[-1].id if len(tasks) == limit else None
    next_url = None
    if next_cursor is not None:
        next_url = str(request.rel_url.update_query({cursor: str(next_cursor)}))
    return json_response(
        {"tasks": [t.to_json() for t in tasks], f"next_{cursor}": next_cursor, "next": next_url}
    )


def _queue_rows(stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, **row} for name, row in stats.items()]


async def list_queues(request: web.Request) -> web.Response:
    """``GET /queues`` → every queue known (``default`` always): counts of tasks that have
    not ended, running, concurrency limit, priority, paused."""
    server = request.app[SERVER]
    return json_response({"queues": _queue_rows(await server.queue_stats())})


def _queue_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not 1 <= len(name) <= MAX_LABEL:
        raise ValidationError(f"a queue name is 1-{MAX_LABEL} characters", field="name")
    return name


async def _queue_answer(request: web.Request, name: str) -> web.Response:
    stats = await request.app[SERVER].queue_stats()
    row = stats.get(name)
    if row is None:  # paused and idle is kept; resumed and idle is forgotten
        row = {"queued": 0, "waiting": 0, "running": 0, "retrying": 0, "paused": False}
    return json_response({"name": name, **row})


async def pause_queue(request: web.Request) -> web.Response:
    """``POST /queues/{name}/pause`` → the queue: it takes tasks, starts none, across
    restarts; running ones go on."""
    name = _queue_name(request)
    await request.app[SERVER].pause_queue(name)
    return await _queue_answer(request, name)


async def resume_queue(request: web.Request) -> web.Response:
    """``POST /queues/{name}/resume`` → the queue, starting tasks again."""
    name = _queue_name(request)
    await request.app[SERVER].resume_queue(name)
    return await _queue_answer(request, name)


def _where(raw: Any) -> Where:
    if not isinstance(raw, dict):
        raise ValidationError("filter must be an object of state, queue, name", field="filter")
    for key, value in raw.items():
        if key not in FILTER_FIELDS:
            raise ValidationError(f"unknown filter field {key!r}", field=f"filter.{key}")
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_LABEL:
            raise ValidationError(
                f"{key} must be a string of 1-{MAX_LABEL} characters", field=f"filter.{key}"
            )
    state = None
    if "state" in raw:
        try:
            state = TaskState(raw["state"])
        except ValueError:
            raise ValidationError(
                f"state must be one of {', '.join(s.value for s in TaskState)}",
                field="filter.state",
            ) from None
    return Where(state=state, queue=raw.get("queue"), name=raw.get("name"))


def _bounded_int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise ValidationError(f"{key} must be an integer from {lo} to {hi}", field=key)
    return value


async def bulk(request: web.Request) -> web.Response:
    """``POST /tasks:bulk {"action": "retry"|"cancel"|"purge", "ids": [...]}`` or
    ``{"action", "filter": {"state"?, "queue"?, "name"?}, "limit"?, "after"?}`` → how many
    matched and were done, why others were not (per id, at most 100), and for a filter
    stopped at ``limit`` the ``next_after`` cursor to call again with."""
    server = request.app[SERVER]
    body = await read_json_object(request, frozenset({"action", "ids", "filter", "limit", "after"}))
    action = check_action(body.get("action"))
    if ("ids" in body) == ("filter" in body):
        raise ValidationError('give "ids" or "filter", one of them', field="ids")
    if "ids" in body:
        ids = body["ids"]
        if not isinstance(ids, list) or not all(is_id(i) for i in ids):
            raise ValidationError("ids must be a list of task ids", field="ids")
        if len(ids) > MAX_BULK_IDS:
            raise ValidationError(f"at most {MAX_BULK_IDS} ids per call", field="ids")
        for key in ("limit", "after"):
            if key in body:
                raise ValidationError(f"{key} goes with filter, not ids", field=key)
        result = await server.bulk(action, ids)
    else:
        where = _where(body["filter"])
        limit = _bounded_int(body, "limit", DEFAULT_BULK, 1, MAX_BULK)
        after = _bounded_int(body, "after", 0, 0, CURSOR_MAX)
        result = await server.bulk_where(action, where, limit=limit, after=after)
    return json_response(result.to_json())
