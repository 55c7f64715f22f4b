"""Pausing a queue: it takes tasks and starts none, until resumed, across restarts;
through the HTTP API (admin scope), ``TaskServer`` and ``taskserver queues``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import ClientFactory, ServerProcess, wait_for
from .jobs_harness import refused
from .test_admin_cli import cli


async def _state(client: Any, task_id: int) -> str:
    body = await (await client.get(f"/tasks/{task_id}")).json()
    return str(body["state"])


async def _queues(client: Any) -> dict[str, dict[str, Any]]:
    body = await (await client.get("/queues")).json()
    return {q["name"]: q for q in body["queues"]}


async def test_a_paused_queue_takes_tasks_and_starts_none_until_resumed(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task_workers=1)
    # Idle, nothing declared: the default queue is listed anyway, not paused.
    assert (await _queues(client))["default"]["paused"] is False
    paused = await client.post("/queues/default/pause")
    assert paused.status == 200, await paused.text()
    assert (await paused.json())["paused"] is True
    held = (await (await client.post("/tasks", json={"data": 1})).json())["id"]
    other = (await (await client.post("/tasks", json={"data": 2, "queue": "other"})).json())["id"]
    # The worker ran a task enqueued after the held one: it skipped the paused queue.
    await wait_for(lambda: _is(client, other, "succeeded"), message="the other queue's task")
    assert await _state(client, held) == "queued"
    queues = await _queues(client)
    assert queues["default"]["paused"] is True
    assert queues["default"]["queued"] == 1
    resumed = await client.post("/queues/default/resume")
    assert (await resumed.json())["paused"] is False
    await wait_for(lambda: _is(client, held, "succeeded"), message="the held task after resume")


async def _is(client: Any, task_id: int, state: str) -> bool:
    return await _state(client, task_id) == state


async def test_a_bad_queue_name_is_refused_naming_it(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    await refused(await client.post("/queues/" + "q" * 201 + "/pause"), 422, "name")
    await refused(await client.post("/queues/" + "q" * 201 + "/resume"), 422, "name")
    # Any other name may be paused: one no task uses starts nothing anyway.
    assert (await (await client.post("/queues/a%20b/pause")).json())["paused"] is True
    # A queue name may hold slashes (labels do), sent as they are or encoded.
    for path in ("/queues/mail/eu/pause", "/queues/mail%2Fus/pause", "/queues/a%0Ab/pause"):
        answer = await (await client.post(path)).json()
        assert answer["paused"] is True, answer
    names = {q["name"] for q in (await (await client.get("/queues")).json())["queues"]}
    assert {"a b", "mail/eu", "mail/us"} <= names


async def _http_state(http: aiohttp.ClientSession, url: str, task_id: int) -> str:
    async with http.get(f"{url}/tasks/{task_id}") as response:
        return str((await response.json())["state"])


async def _enqueue(http: aiohttp.ClientSession, url: str, **body: Any) -> int:
    async with http.post(f"{url}/tasks", json=body) as response:
        assert response.status == 202, await response.text()
        return int((await response.json())["id"])


async def test_pause_survives_a_restart_and_the_cli_resumes_it(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    db = str(tmp_path / "paused.db")
    server = run_server("--task-workers", "1", "--db", db)
    code, out, err = await cli("queues", "pause", "default", "--url", server.url)
    assert (code, out.strip()) == (0, "queue default paused"), err
    async with aiohttp.ClientSession() as http:
        held = await _enqueue(http, server.url, data={"seconds": 0})
    assert server.terminate() == 0

    server = run_server("--task-workers", "1", "--db", db)
    code, out, err = await cli("queues", "list", "--url", server.url)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["name", "paused", "queued"]
    assert any(r.split()[:3] == ["default", "yes", "1"] for r in rows), out
    async with aiohttp.ClientSession() as http:
        other = await _enqueue(http, server.url, data={"seconds": 0}, queue="other")

        async def other_done() -> bool:
            return await _http_state(http, server.url, other) == "succeeded"

        await wait_for(other_done, message="a task of a queue that is not paused")
        assert await _http_state(http, server.url, held) == "queued"
        code, out, err = await cli("queues", "resume", "default", "--url", server.url, "--json")
        assert code == 0, err
        assert '"paused": false' in out

        async def held_done() -> bool:
            return await _http_state(http, server.url, held) == "succeeded"

        await wait_for(held_done, message="the held task once resumed")
    code, out, err = await cli("queues", "pause", "q" * 201, "--url", server.url)
    assert (code, out) == (2, ""), err
    assert "(name)" in err, err


async def test_stats_can_leave_out_the_per_queue_count(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    full = await (await client.get("/stats")).json()
    assert full["queues"]["default"]["paused"] is False
    light = await (await client.get("/stats?queues=false")).json()
    assert "queued" not in light["queues"].get("default", {})  # memory only: no store count
    assert light["tasks"] == full["tasks"]
    assert len(light["history"]["started"]) == 60
    await refused(await client.get("/stats?queues=maybe"), 422, "queues")
