"""taskserver.Client and SyncClient against real servers, with and without tokens."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from taskserver import (
    AccessDenied,
    Client,
    Conflict,
    ServerBusy,
    SyncClient,
    TaskContext,
    TaskNotFound,
    ValidationError,
)
from taskserver.client import parse_sse

from .conftest import ClientFactory

TOKEN = "client-test-token-0123456789-abcdefgh"


async def stepping(ctx: TaskContext) -> Any:
    for step in (1, 2):
        await ctx.progress(step / 2, f"step {step}\nof 2")
    if ctx.data == "fail":
        raise ValueError("asked to")
    return {"echo": ctx.data}


def _url(client: Any) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_enqueue_get_wait_events_with_a_token(make_client: ClientFactory) -> None:
    server = await make_client(task=stepping, api_token=TOKEN)
    async with Client(_url(server), token=TOKEN) as client:
        task_id = await client.task({"n": 1}, queue="default", priority=3)
        done = await client.wait(task_id, timeout=10)
        assert done["state"] == "succeeded"
        assert done["result"] == {"echo": {"n": 1}}
        events = [e async for e in client.events(task_id)]
        assert events[0].event == "queued"
        assert events[-1].event == "finished"
        progress = [e.json() for e in events if e.event == "progress"]
        assert progress[0]["message"] == "step 1\nof 2"
        ids = await client.task_many([{"data": 1}, {"data": 2, "priority": 1}])
        assert len(ids) == 2
        assert (await client.get(ids[0]))["id"] == ids[0]


async def test_errors_are_the_packages_own(make_client: ClientFactory) -> None:
    server = await make_client(task=stepping, api_token=TOKEN)
    async with Client(_url(server)) as anonymous:
        with pytest.raises(AccessDenied) as denied:
            await anonymous.task(1)
        assert denied.value.status == 401
    async with Client(_url(server), token=TOKEN) as client:
        with pytest.raises(TaskNotFound):
            await client.get(999)
        with pytest.raises(ValidationError) as invalid:
            await client.task(1, priority=5000)
        assert invalid.value.field == "priority"
        task_id = await client.task("fail", max_attempts=1)
        failed = await client.wait(task_id, timeout=10)
        assert failed["state"] == "failed"
        with pytest.raises(Conflict):
            await client.cancel(task_id)
        retried = await client.retry(task_id)
        assert retried["state"] in ("queued", "running", "failed")
        with pytest.raises(TaskNotFound):
            [e async for e in client.events(999)]


async def test_server_busy_carries_retry_after(make_client: ClientFactory) -> None:
    server = await make_client(task=None, finish=None, task_workers=0, max_queued=1)
    async with Client(_url(server)) as client:
        await client.task(1)  # no worker takes it: the queue is full
        with pytest.raises(ServerBusy) as busy:
            await client.task(2)
        assert busy.value.retry_after >= 1


async def test_wait_times_out(make_client: ClientFactory) -> None:
    gate = asyncio.Event()

    async def blocked(ctx: TaskContext) -> Any:
        await gate.wait()

    server = await make_client(task=blocked)
    async with Client(_url(server)) as client:
        task_id = await client.task(1)
        with pytest.raises(TimeoutError):
            await client.wait(task_id, timeout=0.5)
        gate.set()
        assert (await client.wait(task_id, timeout=10))["state"] == "succeeded"


async def test_sse_parsing_rules() -> None:
    body = (
        b": a comment\nretry: 1000\n\n"
        b"id: 7\nevent: progress\ndata: a\ndata: b\n\n"
        b"data: no name\r\n\r\n"
        b"id: 9\nevent: empty\n\n"
        b"data:x\n\n"
        b"data: cut off"
    )
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(_Proto(), 2**16, loop=loop)  # type: ignore[arg-type]
    reader.feed_data(body)
    reader.feed_eof()
    events = [e async for e in parse_sse(reader)]
    assert [(e.id, e.event, e.data) for e in events] == [
        ("7", "progress", "a\nb"),
        ("7", "message", "no name"),
        ("9", "message", "x"),
    ]


class _Proto:
    _reading_paused = False

    def pause_reading(self, **_: Any) -> None: ...
    def resume_reading(self, **_: Any) -> None: ...


async def test_sync_client_from_plain_code(make_client: ClientFactory) -> None:
    server = await make_client(task=stepping, api_token=TOKEN)
    url = _url(server)

    def use() -> tuple[dict[str, Any], list[str]]:
        with SyncClient(url, token=TOKEN) as client:
            task_id = client.task("hi")
            done = client.wait(task_id, timeout=10)
            names = [e.event for e in client.events(task_id)]
            with pytest.raises(TaskNotFound):
                client.get(12345)
            return done, names

    done, names = await asyncio.to_thread(use)
    assert done["result"] == {"echo": "hi"}
    assert names[0] == "queued"
    assert names[-1] == "finished"
