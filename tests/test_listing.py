"""GET /tasks pages both ways: oldest first with ``after``, newest first with ``before``."""

from __future__ import annotations

from .conftest import ClientFactory


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
