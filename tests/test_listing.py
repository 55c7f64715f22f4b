"""GET /tasks pages both ways (oldest first with ``after``, newest first with ``before``),
through every task, filtered by state, queue, name or unique key; bad parameters are 422s."""

from __future__ import annotations

import pytest

from .conftest import ClientFactory
from .jobs_harness import refused


async def test_newest_first_pages_with_before_cursor(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    for n in range(5):
        assert (await client.post("/tasks", json={"data": n})).status == 202
    page = await (await client.get("/tasks?order=desc&limit=2")).json()
    assert [t["id"] for t in page["tasks"]] == [5, 4]
    assert page["next_before"] == 4
    page = await (await client.get(page["next"])).json()
    assert [t["id"] for t in page["tasks"]] == [3, 2]
    page = await (await client.get("/tasks?order=desc&before=2&limit=2")).json()
    assert [t["id"] for t in page["tasks"]] == [1]
    assert page["next_before"] is None
    queued = await (await client.get("/tasks?order=desc&state=queued&limit=10")).json()
    assert [t["id"] for t in queued["tasks"]] == [5, 4, 3, 2, 1]


async def test_bad_order_is_refused_naming_it(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    response = await client.get("/tasks?order=sideways")
    assert response.status == 422
    assert (await response.json())["field"] == "order"


async def test_cursor_pages_reach_every_task_with_filters(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    body = {"tasks": [{"data": n, "queue": "a" if n % 3 else "b", "name": "x"} for n in range(130)]}
    assert (await client.post("/tasks:batch", json=body)).status == 202
    seen: list[int] = []
    url: str | None = "/tasks?queue=a&name=x&limit=25"
    while url is not None:
        page = await (await client.get(url)).json()
        seen += [t["id"] for t in page["tasks"]]
        assert all(t["queue"] == "a" for t in page["tasks"])
        url = page["next"]
    assert seen == [n + 1 for n in range(130) if n % 3]  # all of them, in order, once
    newest = await (await client.get("/tasks?queue=b&order=desc&limit=5")).json()
    assert [t["id"] for t in newest["tasks"]] == [130, 127, 124, 121, 118]
    none = await (await client.get("/tasks?name=nobody")).json()
    assert none == {"tasks": [], "next_after": None, "next": None}


async def test_search_by_unique_key(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    await client.post("/tasks", json={"data": 1})
    created = await (await client.post("/tasks", json={"data": 2, "unique_key": "order-7"})).json()
    page = await (await client.get("/tasks?unique_key=order-7")).json()
    assert [t["id"] for t in page["tasks"]] == [created["id"]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=sleeping", "state"),
        ("queue=" + "q" * 201, "queue"),
        ("name=" + "n" * 201, "name"),
        ("unique_key=", "unique_key"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
        ("before=0", "before"),
        ("order=desc&before=x", "before"),
    ],
)
async def test_bad_parameters_are_problems_naming_the_field(
    make_client: ClientFactory, query: str, field: str
) -> None:
    client = await make_client(task_workers=0)
    await refused(await client.get(f"/tasks?{query}"), 422, field)
