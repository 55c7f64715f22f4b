"""Bad input gets a 4xx ``application/problem+json`` naming the problem and the field,
and changes nothing: no row, no event."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import Settings

from .conftest import ClientFactory

Client = TestClient[web.Request, web.Application]
PROBLEM = "application/problem+json"
VALIDATION = (400, 422)


async def assert_problem(
    response: aiohttp.ClientResponse,
    statuses: tuple[int, ...],
    *,
    field: str | None = None,
    mentions: str | None = None,
) -> dict[str, Any]:
    """Check ``response`` is a problem+json error with one of ``statuses``; return its body."""
    text = await response.text()
    assert response.status in statuses, (response.status, text)
    assert response.headers["Content-Type"].startswith(PROBLEM), response.headers
    body: dict[str, Any] = await response.json(content_type=None)
    assert body["status"] == response.status
    assert body["title"]
    assert body["detail"]
    if field is not None:
        assert body.get("field") == field or field in body["detail"], body
    if mentions is not None:
        assert mentions.lower() in body["detail"].lower(), body
    return body


async def assert_nothing_written(client: Client, settings: Settings) -> None:
    """No task and no event exist, through the API and in the SQLite file itself."""
    listed = await (await client.get("/tasks")).json()
    assert listed["tasks"] == []
    stats = await (await client.get("/stats")).json()
    assert stats["queued"] == 0
    assert stats["last_event_id"] == 0
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)


JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "headers", "statuses", "field", "mentions"),
    [
        pytest.param(b"{not json", JSON_HEADERS, VALIDATION, None, "JSON", id="not-json"),
        pytest.param(b"", JSON_HEADERS, VALIDATION, None, "JSON", id="empty-body"),
        pytest.param(
            b'{"data": 1}',
            {"Content-Type": "text/plain"},
            (415,),
            None,
            "Content-Type",
            id="text-plain",
        ),
        pytest.param(
            b'{"data": 1}',
            {"Content-Type": "application/x-www-form-urlencoded"},
            (415,),
            None,
            "Content-Type",
            id="form",
        ),
        pytest.param(b"[1, 2]", JSON_HEADERS, VALIDATION, "body", "object", id="array"),
        pytest.param(b'"data"', JSON_HEADERS, VALIDATION, "body", "object", id="string"),
        pytest.param(b"{}", JSON_HEADERS, VALIDATION, "data", None, id="missing-data"),
        pytest.param(b'{"timeout": 3}', JSON_HEADERS, VALIDATION, "data", None, id="only-timeout"),
        pytest.param(
            b'{"data": 1, "colour": "blue"}',
            JSON_HEADERS,
            VALIDATION,
            "priority",
            None,
            id="unknown-field",
        ),
        pytest.param(
            b'{"data": 1, "timeout": "10"}',
            JSON_HEADERS,
            VALIDATION,
            "timeout",
            None,
            id="timeout-string",
        ),
        pytest.param(
            b'{"data": 1, "timeout": -1}',
            JSON_HEADERS,
            VALIDATION,
            "timeout",
            None,
            id="timeout-negative",
        ),
        pytest.param(
            b'{"data": 1, "timeout": 0}',
            JSON_HEADERS,
            VALIDATION,
            "timeout",
            None,
            id="timeout-zero",
        ),
        pytest.param(
            b'{"data": 1, "timeout": true}',
            JSON_HEADERS,
            VALIDATION,
            "timeout",
            None,
            id="timeout-bool",
        ),
        pytest.param(
            b'{"data": 1, "timeout": [5]}',
            JSON_HEADERS,
            VALIDATION,
            "timeout",
            None,
            id="timeout-list",
        ),
        pytest.param(
            b'{"data": 1, "max_attempts": 1.5}',
            JSON_HEADERS,
            VALIDATION,
            "max_attempts",
            None,
            id="attempts-float",
        ),
        pytest.param(
            b'{"data": 1, "max_attempts": "3"}',
            JSON_HEADERS,
            VALIDATION,
            "max_attempts",
            None,
            id="attempts-string",
        ),
        pytest.param(
            b'{"data": 1, "max_attempts": 0}',
            JSON_HEADERS,
            VALIDATION,
            "max_attempts",
            None,
            id="attempts-zero",
        ),
        pytest.param(
            b'{"data": 1, "max_attempts": true}',
            JSON_HEADERS,
            VALIDATION,
            "max_attempts",
            None,
            id="attempts-bool",
        ),
    ],
)
async def test_bad_post_is_refused_and_writes_nothing(
    make_client: ClientFactory,
    settings: Settings,
    body: bytes,
    headers: dict[str, str],
    statuses: tuple[int, ...],
    field: str | None,
    mentions: str | None,
) -> None:
    client = await make_client(task_workers=0)
    response = await client.post("/tasks", data=body, headers=headers)
    await assert_problem(response, statuses, field=field, mentions=mentions)
    await assert_nothing_written(client, settings)


async def test_oversize_body_is_413_and_writes_nothing(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(task_workers=0, max_body_bytes=200)
    small = await client.post("/tasks", json={"data": "x" * 50})
    assert small.status == 202  # the limit is not simply "everything"
    created = await small.json()
    response = await client.post("/tasks", json={"data": "x" * 400})
    await assert_problem(response, (413,))
    listed = await (await client.get("/tasks")).json()
    assert [t["id"] for t in listed["tasks"]] == [created["id"]]
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone() == (1,)


async def test_body_in_pieces_is_read_whole_and_bounded_alike(
    make_client: ClientFactory, settings: Settings
) -> None:
    # A body that arrives whole is taken from the buffer (http.buffered_body); one that
    # comes in chunks is read by request.read(): the same answers either way.
    client = await make_client(task_workers=0, max_body_bytes=200)

    async def pieces(body: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(body), 16):
            await asyncio.sleep(0)
            yield body[i : i + 16]

    small = orjson.dumps({"data": "x" * 50})
    response = await client.post("/tasks", data=pieces(small), headers=JSON_HEADERS)
    assert response.status == 202, await response.text()
    big = orjson.dumps({"data": "x" * 400})
    response = await client.post("/tasks", data=pieces(big), headers=JSON_HEADERS)
    await assert_problem(response, (413,))
    with sqlite3.connect(settings.db) as conn:
        assert conn.execute("SELECT data FROM tasks").fetchall() == [('"' + "x" * 50 + '"',)]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/tasks/999"),
        ("DELETE", "/tasks/999"),
        ("GET", "/tasks/999/events"),
        ("GET", "/tasks/0"),
        ("GET", "/tasks/abc"),
        ("GET", "/tasks/-1"),
    ],
)
async def test_unknown_task_is_404(make_client: ClientFactory, method: str, path: str) -> None:
    client = await make_client(task_workers=0)
    await client.post("/tasks", json={"data": 1})  # id 1 exists; the ones asked for do not
    response = await client.request(method, path)
    await assert_problem(response, (404,))


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=bogus", "state"),
        ("state=", "state"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("limit=100000000", "limit"),
        ("limit=-5", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("after=1.5", "after"),
    ],
)
async def test_bad_list_query_names_the_parameter(
    make_client: ClientFactory, query: str, field: str
) -> None:
    client = await make_client(task_workers=0)
    response = await client.get(f"/tasks?{query}")
    await assert_problem(response, VALIDATION, field=field)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/stats?queues=false&queues=true", "queues"),
        ("/tasks?limit=1&limit=500", "limit"),
        ("/tasks?state=queued&state=failed", "state"),
        ("/tasks?queue=a&queue=b", "queue"),
        ("/tasks?order=desc&order=asc", "order"),
        ("/events?lastEventID=1&lastEventID=2", "lastEventID"),
    ],
)
async def test_a_query_parameter_given_twice_is_refused_naming_it(
    make_client: ClientFactory, path: str, field: str
) -> None:
    # Which of the two counts would be a guess (schemathesis found /stats taking the first).
    client = await make_client(task_workers=0)
    response = await client.get(path)
    body = await assert_problem(response, VALIDATION, field=field)
    assert "given once" in body["detail"]


@pytest.mark.parametrize(
    ("path", "headers", "field"),
    [
        ("/events", {"Last-Event-ID": "abc"}, "Last-Event-ID"),
        ("/events", {"Last-Event-ID": "-3"}, "Last-Event-ID"),
        ("/events?lastEventID=nope", {}, "lastEventID"),
        ("/events?lastEventID=1e3", {}, "lastEventID"),
        ("/tasks/1/events", {"Last-Event-ID": "x1"}, "Last-Event-ID"),
        ("/tasks/1/events?lastEventID=%20", {}, "lastEventID"),
    ],
)
async def test_bad_last_event_id_names_it(
    make_client: ClientFactory, path: str, headers: dict[str, str], field: str
) -> None:
    client = await make_client(task_workers=0)
    assert (await client.post("/tasks", json={"data": 1})).status == 202
    response = await client.get(path, headers=headers)
    await assert_problem(response, VALIDATION, field=field)
    stats = await (await client.get("/stats")).json()
    assert stats["subscribers"] == 0  # the refused stream holds no subscription
