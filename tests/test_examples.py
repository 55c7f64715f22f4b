"""The examples in examples/ work as the README says."""

from __future__ import annotations

from typing import Any

from taskserver import Settings
from taskserver.app import create_app, load_setup

from .conftest import sse


async def test_mail_app_enqueues_from_its_own_route(
    settings: Settings, aiohttp_client: Any
) -> None:
    app = await create_app(settings, load_setup("examples.mail:setup"))
    client = await aiohttp_client(app)
    response = await client.post("/send", json={"to": "a@example.com"})
    assert response.status == 202
    body = await response.json()
    assert body["topic"].endswith(f"/tasks/{body['id']}")
    task = await (await client.get(f"/tasks/{body['id']}?wait=10")).json()
    assert task["state"] == "succeeded"
    assert task["queue"] == "mail"
    assert task["result"] == {"sent": "a@example.com", "attempt": 1}

    bad = await (await client.post("/send", json={"to": "nobody"})).json()
    failed = await (await client.get(f"/tasks/{bad['id']}?wait=10")).json()
    assert failed["state"] == "failed"
    assert failed["attempts"] == 1  # PermanentError: no retry despite max_attempts=5
    assert "not an address" in failed["error"]


async def test_embedded_app_streams_its_task(settings: Settings, aiohttp_client: Any) -> None:
    from examples.embedded import make_app

    client = await aiohttp_client(make_app(settings))
    body = await (await client.post("/images/cat.png")).json()
    async with client.get(body["events"]) as stream:
        events = await sse(stream).collect()
    assert [e.event for e in events] == ["queued", "started", "progress", "finished"]
