"""Defects schemathesis found (tests/test_openapi_fuzz.py), each pinned by the request."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ClientFactory


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/tasks:purge", {"older_than": 0, "states": [{}]}, "states"),  # was a 500
        ("/tasks", {"data": 1, "queue": [None, None]}, "queue"),  # was a 500
        ("/tasks", {"data": 1, "name": ["x"]}, "name"),  # was a 500
        ("/tasks:batch", {"tasks": [{"data": 1, "queue": [1]}]}, "tasks[0].queue"),
        ("/tasks", {"data": 1, "priority": {}}, "priority"),  # was taken as 0
        ("/tasks", {"data": 1, "priority": ""}, "priority"),
        ("/tasks:retry", {"failed": {}, "ids": []}, "failed"),  # was ignored
        ("/tasks:retry", {"failed": True, "ids": [1]}, "ids"),
    ],
)
async def test_bad_input_is_a_422_naming_the_field(
    make_client: ClientFactory, path: str, body: dict[str, Any], field: str
) -> None:
    client = await make_client()
    response = await client.post(path, json=body)
    assert response.status == 422, await response.text()
    assert response.content_type == "application/problem+json"
    assert (await response.json())["field"] == field


async def test_a_cursor_out_of_range_is_refused_whatever_the_order(
    make_client: ClientFactory,
) -> None:
    client = await make_client()
    response = await client.get("/tasks", params={"before": str(2**62 + 1)})  # was ignored
    assert response.status == 422
    assert (await response.json())["field"] == "before"
    response = await client.get("/tasks", params={"order": "desc", "after": "-1"})
    assert response.status == 422


async def test_preflight_allows_only_the_paths_methods(make_client: ClientFactory) -> None:
    client = await make_client(mercure_subscriptions=True)
    response = await client.options("/.well-known/mercure/subscriptions")
    assert response.headers["Allow"] == "GET, OPTIONS"  # was GET, POST, OPTIONS
    response = await client.options("/.well-known/mercure")
    assert response.headers["Allow"] == "GET, OPTIONS, POST"
