"""The HTTP API through a real aiohttp server: create, read, list, cancel, stats, health."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import TASKSERVER, Settings, SyncTaskContext, TaskContext, TaskServer, attach

from .conftest import ClientFactory, wait_for

Client = TestClient[web.Request, web.Application]


async def post_task(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/tasks", json=body)
    assert response.status == 202, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def get_task(client: Client, task_id: int) -> dict[str, Any]:
    response = await client.get(f"/tasks/{task_id}")
    assert response.status == 200, await response.text()
    task: dict[str, Any] = await response.json()
    return task


async def wait_state(client: Client, task_id: int, *states: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        task = await get_task(client, task_id)
        return task if task["state"] in states else None

    found: dict[str, Any] = await wait_for(reached, message=f"task {task_id} in {states}")
    return found


async def stats(client: Client) -> dict[str, Any]:
    response = await client.get("/stats")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


# --- POST /tasks and GET /tasks/{id} -------------------------------------------------


async def test_post_answers_202_with_links(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    response = await client.post("/tasks", json={"data": [1, 2], "timeout": 5, "max_attempts": 2})
    assert response.status == 202
    body = await response.json()
    assert body["state"] == "queued"
    assert isinstance(body["id"], int)
    assert body["url"] == f"/tasks/{body['id']}"
    assert body["events_url"] == f"/tasks/{body['id']}/events"
    assert response.headers["Location"] == body["url"]
    task = await get_task(client, body["id"])
    assert task["data"] == [1, 2]
    assert task["timeout"] == 5
    assert task["max_attempts"] == 2
    assert task["attempts"] == 0
    assert task["state"] == "queued"


async def test_ids_increase_over_http(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    ids = [(await post_task(client, {"data": n}))["id"] for n in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5


async def test_get_task_shows_outcome_progress_and_timestamps(make_client: ClientFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        await ctx.progress(0.75, "almost")
        return {"doubled": ctx.data * 2}

    client = await make_client(task=task)
    created = await post_task(client, {"data": 21})
    done = await wait_state(client, created["id"], "succeeded")
    assert done["result"] == {"doubled": 42}
    assert done["error"] is None
    assert done["attempts"] == 1
    assert done["progress"] == 0.75
    assert done["message"] == "almost"
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["updated_at"] >= done["finished_at"]


async def test_get_failed_task_shows_error(make_client: ClientFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        raise ValueError("no good")

    client = await make_client(task=task)
    created = await post_task(client, {"data": None})
    failed = await wait_state(client, created["id"], "failed")
    assert failed["error"] == "ValueError: no good"
    assert failed["result"] is None
    assert failed["finished_at"] is not None


# --- GET /tasks --------------------------------------------------------------------


async def test_list_pages_with_a_cursor(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    ids = [(await post_task(client, {"data": n}))["id"] for n in range(7)]
    seen: list[int] = []
    url: str | None = "/tasks?limit=3"
    pages = 0
    while url is not None:
        response = await client.get(url)
        assert response.status == 200
        page = await response.json()
        pages += 1
        assert len(page["tasks"]) <= 3
        seen += [t["id"] for t in page["tasks"]]
        if page["next_after"] is not None:
            assert page["next_after"] == page["tasks"][-1]["id"]
            assert "after=" in page["next"]
        url = page["next"]
        assert pages < 10
    assert seen == ids
    assert pages == 3

    response = await client.get(f"/tasks?after={ids[4]}&limit=10")
    page = await response.json()
    assert [t["id"] for t in page["tasks"]] == ids[5:]
    assert page["next_after"] is None
    assert page["next"] is None


async def test_list_filters_by_state(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    ids = [(await post_task(client, {"data": n}))["id"] for n in range(4)]
    for task_id in ids[1::2]:
        response = await client.delete(f"/tasks/{task_id}")
        assert response.status == 200
    cancelled = await (await client.get("/tasks?state=cancelled")).json()
    queued = await (await client.get("/tasks?state=queued")).json()
    assert [t["id"] for t in cancelled["tasks"]] == ids[1::2]
    assert [t["id"] for t in queued["tasks"]] == ids[0::2]
    assert all(t["state"] == "queued" for t in queued["tasks"])
    # The cursor keeps the filter: page through the queued ones one at a time.
    seen: list[int] = []
    url: str | None = "/tasks?state=queued&limit=1"
    while url is not None and len(seen) < 10:
        page = await (await client.get(url)).json()
        seen += [t["id"] for t in page["tasks"]]
        url = page["next"]
    assert seen == ids[0::2]


# --- DELETE /tasks/{id} ----------------------------------------------------------------


async def test_cancel_queued_task_then_409(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    created = await post_task(client, {"data": 1})
    response = await client.delete(created["url"])
    assert response.status == 200
    assert (await response.json())["state"] == "cancelled"
    assert (await get_task(client, created["id"]))["state"] == "cancelled"
    again = await client.delete(created["url"])
    assert again.status == 409
    assert again.headers["Content-Type"].startswith("application/problem+json")
    assert "cancelled" in (await again.json())["detail"]
    assert (await stats(client))["cancelled"] == 1


async def test_cancel_queued_task_never_runs(make_client: ClientFactory) -> None:
    gate = asyncio.Event()
    ran: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        ran.append(ctx.id)
        await gate.wait()
        return None

    client = await make_client(task=task, task_workers=1)
    first = await post_task(client, {"data": "blocker"})
    await wait_state(client, first["id"], "running")
    second = await post_task(client, {"data": "victim"})
    assert (await client.delete(second["url"])).status == 200
    gate.set()
    await wait_state(client, first["id"], "succeeded")
    third = await post_task(client, {"data": "after"})
    await wait_state(client, third["id"], "succeeded")
    assert ran == [first["id"], third["id"]]
    assert (await get_task(client, second["id"]))["state"] == "cancelled"


async def test_cancel_ended_task_is_409(make_client: ClientFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        if ctx.data == "fail":
            raise RuntimeError("as asked")
        return ctx.data

    client = await make_client(task=task)
    ok = await post_task(client, {"data": "ok"})
    bad = await post_task(client, {"data": "fail"})
    for created, state in ((ok, "succeeded"), (bad, "failed")):
        await wait_state(client, created["id"], state)
        response = await client.delete(created["url"])
        assert response.status == 409
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert (await get_task(client, created["id"]))["state"] == state


async def test_cancel_running_async_task(make_client: ClientFactory) -> None:
    interrupted = asyncio.Event()
    finished: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.set()
            raise
        return None

    async def finish(ctx: TaskContext, result: Any) -> None:
        finished.append(ctx.id)

    client = await make_client(task=task, finish=finish)
    created = await post_task(client, {"data": None})
    await wait_state(client, created["id"], "running")
    response = await client.delete(created["url"])
    assert response.status == 200
    body = await response.json()
    assert body["state"] == "cancelled"
    assert interrupted.is_set()
    assert finished == []
    assert (await client.delete(created["url"])).status == 409
    counters = await stats(client)
    assert counters["running"] == 0
    assert counters["cancelled"] == 1


async def test_cancel_running_thread_task_discards_result(make_client: ClientFactory) -> None:
    saw_cancel = threading.Event()
    finished: list[int] = []

    def task(ctx: SyncTaskContext) -> Any:
        assert threading.current_thread() is not threading.main_thread()
        if ctx.data is not None:
            return {"quick": ctx.data}
        for _ in range(1000):  # bounded: at most ~10 s
            if ctx.cancelled:
                saw_cancel.set()
                break
            threading.Event().wait(0.01)
        return {"late": "result"}

    async def finish(ctx: TaskContext, result: Any) -> None:
        finished.append(ctx.id)

    client = await make_client(task=task, finish=finish, task_workers=1)
    created = await post_task(client, {"data": None})
    await wait_state(client, created["id"], "running")
    response = await client.delete(created["url"])
    assert response.status == 200
    assert (await response.json())["state"] == "cancelled"
    await wait_for(saw_cancel.is_set, message="the thread sees ctx.cancelled")
    # The thread returns a result after the cancel: it must be thrown away. With one
    # worker the pool has one thread, so once the next task ran the late return is done.
    after = await post_task(client, {"data": "next"})
    await wait_state(client, after["id"], "succeeded")
    task_now = await get_task(client, created["id"])
    assert task_now["state"] == "cancelled"
    assert task_now["result"] is None
    assert finished == [after["id"]]


async def test_cancel_unknown_task_is_404(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    response = await client.delete("/tasks/12345")
    assert response.status == 404
    assert response.headers["Content-Type"].startswith("application/problem+json")


# --- GET /stats and GET /healthz ---------------------------------------------------------


async def test_stats_count_workers_and_tasks(make_client: ClientFactory) -> None:
    gate = asyncio.Event()

    async def task(ctx: TaskContext) -> Any:
        if ctx.data == "fail":
            raise RuntimeError("asked to")
        await gate.wait()
        return None

    client = await make_client(task=task, task_workers=2)
    idle = await stats(client)
    assert idle["workers"] == {"total": 2, "busy": 0, "idle": 2}
    assert idle["queued"] == idle["running"] == idle["succeeded"] == idle["failed"] == 0

    ids = [(await post_task(client, {"data": n}))["id"] for n in range(3)]

    async def two_running() -> dict[str, Any] | None:
        counters = await stats(client)
        return counters if counters["running"] == 2 else None

    busy = await wait_for(two_running, message="two tasks running")
    assert busy["workers"] == {"total": 2, "busy": 2, "idle": 0}
    assert busy["queued"] == 1

    gate.set()
    for task_id in ids:
        await wait_state(client, task_id, "succeeded")
    failing = await post_task(client, {"data": "fail"})
    await wait_state(client, failing["id"], "failed")

    async def settled() -> dict[str, Any] | None:
        counters = await stats(client)
        return counters if counters["workers"]["busy"] == 0 else None

    done = await wait_for(settled, message="workers idle")
    assert done["workers"] == {"total": 2, "busy": 0, "idle": 2}
    assert (done["queued"], done["running"], done["succeeded"], done["failed"]) == (0, 0, 3, 1)


async def test_healthz(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}
    assert client.app is not None
    assert client.app[TASKSERVER].accepting


async def test_an_embedding_app_keeps_its_own_errors(
    aiohttp_client: Any, settings: Settings
) -> None:
    # problem+json and the discovery Link belong to taskserver's routes only: an
    # application that mounts taskserver keeps its own error pages and headers.
    async def own(request: web.Request) -> web.Response:
        raise web.HTTPConflict(text="the app's own words")

    server = TaskServer(dataclasses.replace(settings, task_workers=0))
    app = web.Application()
    app.router.add_get("/own", own)
    attach(app, server, prefix="/jobs")
    client: TestClient[web.Request, web.Application] = await aiohttp_client(app)

    response = await client.get("/own")
    assert response.status == 409
    assert response.content_type == "text/plain"
    assert await response.text() == "the app's own words"
    assert "Link" not in response.headers

    response = await client.get("/jobs/tasks/12345")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert (await response.json())["field"] == "id"
    assert any('rel="mercure"' in link for link in response.headers.getall("Link"))
