"""The shortest path through the product: enqueue over HTTP, watch it finish over SSE."""

from __future__ import annotations

import orjson

from .conftest import ClientFactory, sse


async def test_post_task_runs_and_streams_to_the_end(make_client: ClientFactory) -> None:
    client = await make_client()
    response = await client.post("/tasks", json={"data": {"n": 1}})
    assert response.status == 202
    body = await response.json()
    assert response.headers["Location"] == body["url"] == f"/tasks/{body['id']}"
    async with client.get(body["events_url"]) as stream:
        events = await sse(stream).collect()
    assert [e.event for e in events] == ["queued", "started", "finished"]
    assert orjson.loads(events[-1].data)["result"] == {"echo": {"n": 1}}
    task = await (await client.get(body["url"])).json()
    assert task["state"] == "succeeded"
    assert task["result"] == {"echo": {"n": 1}}
