"""``POST /tasks:bulk``: retry, cancel or purge a selection or what a filter matches,
a page at a time, with a cursor past ``limit``; the counts stay exact."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from taskserver import PermanentError, TaskContext, TaskState
from taskserver.runtime.bulk import Where

from .conftest import ClientFactory, ServerFactory, wait_for
from .jobs_harness import refused

FAILED_ONCE: set[tuple[str, int]] = set()


async def fails_first_time(ctx: TaskContext) -> Any:
    key = (str(ctx.data["run"]), ctx.id)
    if ctx.data.get("fail") and key not in FAILED_ONCE:
        FAILED_ONCE.add(key)
        raise PermanentError("first attempt fails")
    return ctx.data


async def _stats(client: Any) -> dict[str, Any]:
    body: dict[str, Any] = await (await client.get("/stats")).json()
    return body


async def _count(client: Any, state: str) -> int:
    return int((await _stats(client))["tasks"][state])


async def test_bulk_retry_of_every_failure_by_filter_in_pages(make_client: ClientFactory) -> None:
    client = await make_client(fails_first_time, task_workers=2)
    tasks = [{"data": {"run": "retry", "fail": n < 7}} for n in range(10)]
    assert (await client.post("/tasks:batch", json={"tasks": tasks})).status == 202

    async def settled() -> bool:
        return await _count(client, "failed") == 7 and await _count(client, "succeeded") == 3

    await wait_for(settled, message="7 failures and 3 successes")
    body = {"action": "retry", "filter": {"state": "failed"}, "limit": 4}
    first = await (await client.post("/tasks:bulk", json=body)).json()
    assert (first["matched"], first["done"], first["errors"]) == (4, 4, {})
    assert first["next_after"] == 4
    rest = await (
        await client.post("/tasks:bulk", json={**body, "after": first["next_after"]})
    ).json()
    assert (rest["matched"], rest["done"], rest["next_after"]) == (3, 3, None)

    async def all_succeeded() -> bool:
        return await _count(client, "succeeded") == 10

    await wait_for(all_succeeded, message="every retried task to succeed")
    assert await _count(client, "failed") == 0
    # The charts' counters saw every start and end, in the last minute or two.
    history = (await _stats(client))["history"]
    assert len(history["succeeded"]) == 60
    assert (sum(history["started"]), sum(history["succeeded"]), sum(history["failed"])) == (
        17,
        10,
        7,
    )
    assert max(history["wait_max"]) >= max(history["wait_mean"]) >= 0


@pytest.mark.parametrize("call", ["bulk_where", "retry_failed"])
async def test_a_filter_finds_what_the_counts_show_before_it_is_on_disk(
    make_server: ServerFactory, call: str
) -> None:
    # A failure is counted when the worker reports it and committed with the next
    # batch; a retry of "every failed task" asked in between must still find it.
    go = asyncio.Event()

    async def fails(ctx: TaskContext) -> Any:
        await go.wait()
        raise PermanentError("fails")

    server = await make_server(fails, task_workers=1)
    task_id = await server.task({"n": 1})
    await wait_for(lambda: server.stats()["tasks"]["running"] == 1, message="it to start")
    lock = sqlite3.connect(server.settings.db, isolation_level=None, check_same_thread=False)
    try:
        # Another writer holds the database: the failure cannot commit yet.
        await asyncio.to_thread(lock.execute, "BEGIN IMMEDIATE")
        go.set()
        await wait_for(lambda: server.stats()["tasks"]["failed"] == 1, message="it to fail")
        if call == "bulk_where":
            retry: Any = server.bulk_where("retry", Where(state=TaskState.FAILED))
        else:
            retry = server.retry_failed()
        retrying = asyncio.ensure_future(retry)
        await asyncio.wait({retrying}, timeout=0.3)  # before the fix it answered here
    finally:
        lock.rollback()
        lock.close()
    result = await retrying
    if call == "bulk_where":
        assert (result.matched, result.done, result.errors) == (1, 1, {})
    else:
        assert result == [task_id]


async def test_bulk_cancel_and_purge_a_selection(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    body = {"tasks": [{"data": n, "queue": "q"} for n in range(5)]}
    assert (await client.post("/tasks:batch", json=body)).status == 202
    cancel = {"action": "cancel", "ids": [1, 2, 3, 99]}
    answer = await (await client.post("/tasks:bulk", json=cancel)).json()
    assert (answer["matched"], answer["done"]) == (4, 3)
    assert list(answer["errors"]) == ["99"]
    assert await _count(client, "cancelled") == 3
    purge = {"action": "purge", "ids": [1, 2, 4]}  # 4 is still queued
    answer = await (await client.post("/tasks:bulk", json=purge)).json()
    assert (answer["matched"], answer["done"]) == (3, 2)
    assert "not ended" in answer["errors"]["4"]
    assert (await client.get("/tasks/1")).status == 404
    assert (await client.get("/tasks/3")).status == 200
    counts = (await _stats(client))["tasks"]
    assert (counts["cancelled"], counts["queued"]) == (1, 2)
    # A filter: cancel what is left of queue q, then purge every cancelled task.
    answer = await (
        await client.post("/tasks:bulk", json={"action": "cancel", "filter": {"queue": "q"}})
    ).json()
    assert (answer["matched"], answer["done"]) == (3, 2)  # task 3 had already ended
    answer = await (
        await client.post("/tasks:bulk", json={"action": "purge", "filter": {"state": "cancelled"}})
    ).json()
    assert answer["done"] == 3
    assert (await _stats(client))["tasks"]["cancelled"] == 0
    page = await (await client.get("/tasks")).json()
    assert page["tasks"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ids": [1]}, "action"),
        ({"action": "delete", "ids": [1]}, "action"),
        ({"action": "retry"}, "ids"),
        ({"action": "retry", "ids": [1], "filter": {}}, "ids"),
        ({"action": "retry", "ids": [0]}, "ids"),
        ({"action": "retry", "ids": [True]}, "ids"),
        ({"action": "retry", "ids": [1], "limit": 5}, "limit"),
        ({"action": "retry", "filter": {"colour": "red"}}, "filter.colour"),
        ({"action": "retry", "filter": {"state": "sleeping"}}, "filter.state"),
        ({"action": "retry", "filter": {"queue": "q" * 201}}, "filter.queue"),
        ({"action": "retry", "filter": {"name": 5}}, "filter.name"),
        ({"action": "retry", "filter": []}, "filter"),
        ({"action": "purge", "filter": {"state": "queued"}}, "filter.state"),
        ({"action": "retry", "filter": {}, "limit": 0}, "limit"),
        ({"action": "retry", "filter": {}, "after": -1}, "after"),
        ({"action": "retry", "filter": {}, "extra": 1}, "extra"),
    ],
)
async def test_bad_bulk_bodies_are_refused_naming_the_field(
    make_client: ClientFactory, body: dict[str, Any], field: str
) -> None:
    client = await make_client(task_workers=0)
    await refused(await client.post("/tasks:bulk", json=body), 422, field)
