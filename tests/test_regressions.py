"""Defects found by trying taskserver from outside (issue 10, section 3), each
reproduced through a real server on a loopback socket before it was fixed.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskserver import Settings, TaskContext, ValidationError

from .conftest import ClientFactory, sse, wait_for
from .jobs_harness import Gate, Jobs, all_tasks, get_json, post, refused, state_of
from .test_mercure import (
    BOOK,
    HUB,
    PUBLISHER,
    bearer,
    hub_client,
    publish,
    published,
    subscribed,
    token,
)


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Held:
    """A task callback that holds ``"hold"`` tasks until the gate opens; counts runs by id."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.runs: collections.Counter[int] = collections.Counter()

    async def run(self, ctx: TaskContext) -> Any:
        self.runs[ctx.id] += 1
        if ctx.data == "hold":
            assert await self.gate.wait()
        return ctx.data


# --- 2. retry of a task cancelled while it was queued -----------------------------------


async def test_retry_of_a_task_cancelled_while_queued(jobs: Jobs) -> None:
    held = Held()
    client, server = await jobs.client(held.run, task_workers=1)
    blocker = (await post(client, "/tasks", {"data": "hold"}))["id"]
    await wait_for(lambda: held.runs[blocker], message="the blocker runs")
    queued = (await post(client, "/tasks", {"data": "queued", "priority": 3}))["id"]
    other = (await post(client, "/tasks", {"data": "other", "priority": 3}))["id"]
    cancelled = await client.delete(f"/tasks/{queued}")
    assert cancelled.status == 200, await cancelled.text()
    assert (await cancelled.json())["state"] == "cancelled"
    # The dashboard's Cancel then Retry: the cancelled task's old entry is still in the
    # ready heap, with the same priority and id as the retried one.
    retried = await client.post(f"/tasks/{queued}/retry")
    assert retried.status == 200, await retried.text()
    body = await retried.json()
    assert (body["state"], body["attempts"]) == ("queued", 0)
    # Cancel and retry once more, with the first stale entry still there.
    assert (await client.delete(f"/tasks/{queued}")).status == 200
    again = await client.post(f"/tasks/{queued}/retry")
    assert again.status == 200, await again.text()
    held.gate.open()
    done = await state_of(server, queued, "succeeded")
    assert done.result == "queued"
    await state_of(server, other, "succeeded")
    assert held.runs[queued] == 1  # once, however many stale entries it left
    stats = await get_json(client, "/stats")
    assert (stats["queued"], stats["running"], stats["cancelled"]) == (0, 0, 0)


# --- 3. concurrent posts with one unique_key -------------------------------------------


async def test_concurrent_posts_with_one_unique_key_all_get_the_task(jobs: Jobs) -> None:
    held = Held()
    client, _ = await jobs.client(held.run, task_workers=1)
    statuses: collections.Counter[int] = collections.Counter()
    for round_ in range(40):
        body = {"data": "hold", "unique_key": f"report:{round_}"}
        responses = await asyncio.gather(*(client.post("/tasks", json=body) for _ in range(4)))
        answers = []
        for response in responses:
            statuses[response.status] += 1
            assert response.status in (200, 202), f"{response.status}: {await response.text()}"
            answers.append(await response.json())
        assert len({a["id"] for a in answers}) == 1, answers
        assert sorted(a["existing"] for a in answers) == [False, True, True, True]
    assert statuses == {202: 40, 200: 120}
    held.gate.open()
    assert len(await all_tasks(client)) == 40


# --- 4. a Mercure publish with a body that is not UTF-8 ----------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&data=%FF%FE",
        b"topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&data=\xff\xfe",
        b"topic=%C3%28",
    ],
)
async def test_publish_with_invalid_utf8_is_400(make_client: ClientFactory, body: bytes) -> None:
    client = await hub_client(make_client)
    response = await client.post(
        HUB,
        data=body,
        headers={**bearer(PUBLISHER), "Content-Type": "application/x-www-form-urlencoded"},
    )
    problem = await refused(response, 400, None)
    assert "UTF-8" in problem["detail"], problem
    assert await published(client, data="still fine")  # the hub still publishes


# --- 5. a batch that can never fit -------------------------------------------------------


async def test_a_batch_larger_than_max_queued_is_refused_for_good(jobs: Jobs) -> None:
    held = Held()
    client, server = await jobs.client(held.run, task_workers=1, max_queued=5)
    too_many = {"tasks": [{"data": i} for i in range(6)]}
    response = await client.post("/tasks:batch", json=too_many)
    problem = await refused(response, 422, "tasks")
    assert "max_queued is 5" in problem["detail"], problem
    assert "Retry-After" not in response.headers
    with pytest.raises(ValidationError, match="max_queued"):
        await server.task_many(list(range(6)))
    assert await all_tasks(client) == []
    # One that would fit in an emptier queue still gets 503 and Retry-After.
    blocker = (await post(client, "/tasks", {"data": "hold"}))["id"]
    await wait_for(lambda: held.runs[blocker], message="the blocker runs")
    await post(client, "/tasks:batch", {"tasks": [{"data": i} for i in range(3)]})
    busy = await client.post("/tasks:batch", json={"tasks": [{"data": i} for i in range(3)]})
    await refused(busy, 503, None)
    assert busy.headers["Retry-After"] == "5"
    held.gate.open()


# --- 6. integers beyond 64 bits ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"data": 18446744073709551616}', "data"),
        (b'{"data": {"n": [1, -9223372036854775809]}}', "data.n[1]"),
        (b'{"data": 1, "priority": 123456789012345678901234567890}', "priority"),
    ],
)
async def test_integers_beyond_64_bits_are_refused(jobs: Jobs, body: bytes, field: str) -> None:
    client, _ = await jobs.client()
    headers = {"Content-Type": "application/json"}
    response = await client.post("/tasks", data=body, headers=headers)
    problem = await refused(response, 422, field)
    assert "64-bit" in problem["detail"], problem
    batch = b'{"tasks": [{"data": 1}, ' + body + b"]}"
    response = await client.post("/tasks:batch", data=batch, headers=headers)
    await refused(response, 422, f"tasks[1].{field}")
    assert await all_tasks(client) == []


async def test_integers_at_the_64_bit_limits_and_long_digit_runs_are_kept(jobs: Jobs) -> None:
    client, server = await jobs.client()
    data = {
        "max": 18446744073709551615,
        "min": -9223372036854775808,
        "text": "12345678901234567890123456789",
        "float": 1.2345678901234567890123,
    }
    task_id = (await post(client, "/tasks", {"data": data}))["id"]
    done = await state_of(server, task_id, "succeeded")
    assert done.data == data
    assert done.result == {"echo": data}


@pytest.mark.parametrize("depth", [900, 1000, 1020])
@pytest.mark.parametrize("filler", [b'"12345678901234567890"', b"18446744073709551616"])
async def test_a_deeply_nested_body_with_a_long_digit_run_is_a_4xx(
    jobs: Jobs, depth: int, filler: bytes
) -> None:
    # orjson takes up to 1024 levels; the standard library's parse of the digit check
    # (deeper than its recursion limit) raised RecursionError, a 500.
    client, _ = await jobs.client()
    body = b'{"data": ' + b"[" * depth + filler + b"]" * depth + b"}"
    headers = {"Content-Type": "application/json"}
    response = await client.post("/tasks", data=body, headers=headers)
    assert response.status in (400, 422), (response.status, await response.text())
    problem = await refused(response, response.status, None)
    if filler.startswith(b"1"):
        assert response.status == 422
        assert "64-bit" in problem["detail"], problem
    assert await all_tasks(client) == []


async def test_the_python_api_refuses_integers_beyond_64_bits(jobs: Jobs) -> None:
    server = await jobs.server()
    with pytest.raises(ValidationError, match="64-bit") as raised:
        await server.task({"n": 2**64})
    assert raised.value.field == "data"
    with pytest.raises(ValidationError, match="64-bit"):
        await server.task_many([1, {"n": -(2**63) - 1}])
    assert await server.list_tasks() == []


# --- 8. a publisher id the hub has seen --------------------------------------------------


async def test_a_seen_publisher_id_is_accepted_as_the_reference_hub_does(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client)
    async with client.get(HUB, params={"topic": BOOK}) as response:
        stream = sse(response)
        assert await published(client, id="urn:uuid:dup", data="first") == "urn:uuid:dup"
        responses = await asyncio.gather(
            *(publish(client, id="urn:uuid:dup", data=f"again {i}") for i in range(3))
        )
        assert [r.status for r in responses] == [200, 200, 200]
        assert [await r.text() for r in responses] == ["urn:uuid:dup"] * 3
        live = await stream.collect(4)
    assert [e.id for e in live] == ["urn:uuid:dup"] * 4
    assert sorted(e.data for e in live) == ["again 0", "again 1", "again 2", "first"]
    await published(client, id="urn:uuid:after", data="after")
    # Resuming from a repeated id replays what followed its first use, as the reference
    # hub does: duplicates rather than a gap.
    headers = {"Last-Event-ID": "urn:uuid:dup"}
    async with client.get(HUB, params={"topic": BOOK}, headers=headers) as response:
        assert response.headers["Last-Event-ID"] == "urn:uuid:dup"
        replayed = await sse(response).collect(4)
    assert [e.data for e in replayed] == [e.data for e in live[1:]] + ["after"]


async def test_a_reused_id_keeps_private_updates_private(make_client: ClientFactory) -> None:
    # The conformance suite reuses ids: its private cases passed only while the hub
    # refused the second POST.
    client = await hub_client(make_client)
    allowed = bearer(token(None, [BOOK]))
    async with (
        subscribed(client) as (anonymous, _),
        subscribed(client, headers=allowed) as (authorized, _),
    ):
        await published(client, id="urn:uuid:same", data="public")
        await published(client, id="urn:uuid:same", data="secret", private="on")
        await published(client, id="urn:uuid:same", data="public again")
        assert [e.data for e in await authorized.collect(3)] == [
            "public",
            "secret",
            "public again",
        ]
        assert [e.data for e in await anonymous.collect(2)] == ["public", "public again"]
    for headers, expected in (({}, ["public again"]), (allowed, ["secret", "public again"])):
        replay = {**headers, "Last-Event-ID": "urn:uuid:same"}
        async with subscribed(client, headers=replay) as (reader, response):
            assert response.headers["Last-Event-ID"] == "urn:uuid:same"
            assert [e.data for e in await reader.collect(len(expected))] == expected


async def test_a_publish_form_with_too_many_fields_is_400(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await publish(client, fields={f"f{i}": "1" for i in range(200)})
    problem = await refused(response, 400, None)
    assert "form fields" in problem["detail"], problem
