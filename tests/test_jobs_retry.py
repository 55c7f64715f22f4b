"""Retries with backoff: attempts, delays (base x factor^(n-1), capped, jittered), where
the policy comes from (call < task name < queue < settings), PermanentError and RetryLater.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from taskserver import Settings, TaskContext, TaskServer
from taskserver.errors import PermanentError, RetryLater, ValidationError
from taskserver.models import RetryPolicy

from .conftest import sse, wait_for
from .jobs_harness import (
    Clock,
    Jobs,
    all_tasks,
    event_types,
    flaky_task,
    get_json,
    post,
    refused,
    retry_events,
    state_of,
    stored_events,
)


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


def fixed(base: float, factor: float = 2.0, cap: float = 960.0) -> RetryPolicy:
    """A policy without jitter, so delays are exact."""
    return RetryPolicy(base=base, factor=factor, cap=cap, jitter=0.0)


async def delays_of(server: TaskServer, task_id: int) -> list[float]:
    return [e["delay"] for e in retry_events(await stored_events(server, task_id))]


def check_due_times_kept(events: list[dict[str, Any]]) -> None:
    """Each retrying event says when; the next attempt starts then, not before."""
    for i, event in enumerate(events):
        if event["type"] != "retrying":
            continue
        assert event["state"] == "retrying"
        assert event["available_at"] == pytest.approx(event["at"] + event["delay"], abs=0.05)
        restart = next(e for e in events[i + 1 :] if e["type"] == "started")
        assert restart["at"] >= event["available_at"]


# --- the policy itself -----------------------------------------------------------------


def test_policy_delay_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(base=2.0, factor=3.0, cap=50.0, jitter=0.25)
    middle = [policy.delay(n, 0.5) for n in range(1, 6)]
    assert middle == [2.0, 6.0, 18.0, 50.0, 50.0]
    assert policy.delay(1, 0.0) == pytest.approx(1.5)
    assert policy.delay(1, 1.0) == pytest.approx(2.5)
    for n in range(1, 8):
        for rand in (0.0, 0.3, 0.7, 0.999):
            assert 0.0 <= policy.delay(n, rand) <= 50.0
    assert RetryPolicy(base=1, factor=2, cap=960, jitter=0).delay(20) == 960.0


# --- through the Python API --------------------------------------------------------------


async def test_retries_until_max_attempts_with_exponential_delays(jobs: Jobs) -> None:
    server = await jobs.server(flaky_task)
    task_id = await server.task({"fail": 99}, max_attempts=3, retry=fixed(0.05))
    task = await state_of(server, task_id, "failed")
    assert task.attempts == 3
    assert task.error == "ValueError: boom on attempt 3"
    events = await stored_events(server, task_id)
    assert [e["type"] for e in events] == [
        "queued",
        *["started", "retrying", "queued"] * 2,
        "started",
        "failed",
    ]
    assert [e["delay"] for e in retry_events(events)] == [0.05, 0.1]
    assert [e["attempt"] for e in retry_events(events)] == [1, 2]
    check_due_times_kept(events)


async def test_a_task_that_recovers_succeeds_on_a_later_attempt(jobs: Jobs) -> None:
    server = await jobs.server(flaky_task)
    result = await server.task_wait({"fail": 2}, 10, max_attempts=5, retry=fixed(0.02))
    assert result == {"attempt": 3}


async def test_delay_is_capped(jobs: Jobs) -> None:
    server = await jobs.server(flaky_task)
    task_id = await server.task(
        {"fail": 99}, max_attempts=4, retry=fixed(0.04, factor=10.0, cap=0.1)
    )
    await state_of(server, task_id, "failed")
    assert await delays_of(server, task_id) == [0.04, 0.1, 0.1]


async def test_jitter_spreads_delays_within_its_band(jobs: Jobs) -> None:
    server = await jobs.server(flaky_task, task_workers=4)
    policy = RetryPolicy(base=0.1, factor=2.0, cap=10.0, jitter=0.5)
    ids = [await server.task({"fail": 1}, max_attempts=2, retry=policy) for _ in range(8)]
    assert await server.wait(ids, 10) == [{"attempt": 2}] * 8
    delays = [(await delays_of(server, i))[0] for i in ids]
    assert all(0.05 <= d <= 0.15 for d in delays), delays
    assert len(set(delays)) > 1, delays


async def test_settings_are_the_global_default_policy(jobs: Jobs) -> None:
    server = await jobs.server(
        flaky_task,
        retry_base=0.03,
        retry_factor=3.0,
        retry_cap=0.2,
        retry_jitter=0.0,
        default_max_attempts=4,
    )
    task_id = await server.task({"fail": 99})
    task = await state_of(server, task_id, "failed")
    assert task.max_attempts == 4
    assert task.attempts == 4
    assert await delays_of(server, task_id) == pytest.approx([0.03, 0.09, 0.2])


async def test_policy_precedence_call_then_name_then_queue_then_settings(jobs: Jobs) -> None:
    def configure(server: TaskServer) -> None:
        server.queue("q", retry=fixed(0.02), max_attempts=2)
        server.defaults("named", retry=fixed(0.03), max_attempts=2)
        server.defaults("routed", queue="q")

    server = await jobs.server(
        flaky_task, configure=configure, retry_base=0.01, retry_jitter=0.0, default_max_attempts=2
    )
    plain = await server.task({"fail": 1})
    in_queue = await server.task({"fail": 1}, queue="q")
    by_name = await server.task({"fail": 1}, queue="q", name="named")
    by_call = await server.task({"fail": 1}, queue="q", name="named", retry=fixed(0.04))
    routed = await server.task({"fail": 1}, name="routed")
    assert (
        await server.wait([plain, in_queue, by_name, by_call, routed], 10) == [{"attempt": 2}] * 5
    )
    assert await delays_of(server, plain) == [0.01]
    assert await delays_of(server, in_queue) == [0.02]
    assert await delays_of(server, by_name) == [0.03]
    assert await delays_of(server, by_call) == [0.04]
    assert await delays_of(server, routed) == [0.02]
    assert (await server.get(routed)).queue == "q"
    assert (await server.get(by_name)).retry == fixed(0.03)
    # max_attempts from a queue or a name applies too: one failure more ends the task.
    failing = await server.task({"fail": 99}, queue="q")
    assert (await state_of(server, failing, "failed")).attempts == 2


async def test_permanent_error_fails_at_once(jobs: Jobs) -> None:
    async def task(ctx: TaskContext) -> Any:
        raise PermanentError("the address does not exist")

    server = await jobs.server(task)
    task_id = await server.task(None, max_attempts=5, retry=fixed(0.01))
    failed = await state_of(server, task_id, "failed")
    assert failed.attempts == 1
    assert failed.error == "PermanentError: the address does not exist"
    assert await event_types(server, task_id) == ["queued", "started", "failed"]


async def test_retry_later_waits_without_spending_an_attempt(jobs: Jobs) -> None:
    clock = Clock()
    calls: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        calls.append(ctx.attempt)
        if len(calls) <= 2:
            raise RetryLater(1000)
        return {"calls": len(calls), "attempt": ctx.attempt}

    server = await jobs.server(task, clock=clock)
    task_id = await server.task("x", max_attempts=1)
    waiting = await state_of(server, task_id, "waiting")
    assert waiting.attempts == 0
    assert waiting.available_at == pytest.approx(clock() + 1000, abs=5)
    events = await stored_events(server, task_id)
    assert events[-1]["type"] == "waiting"
    assert events[-1]["available_at"] == waiting.available_at
    assert server.stats()["tasks"]["waiting"] == 1

    clock.advance(1000, server)
    await wait_for(lambda: len(calls) == 2, message="the second call")
    await state_of(server, task_id, "waiting")
    clock.advance(1000, server)
    done = await state_of(server, task_id, "succeeded")
    # Two postponements and max_attempts=1: neither counted as an attempt.
    assert calls == [1, 1, 1]
    assert done.attempts == 1
    assert done.result == {"calls": 3, "attempt": 1}
    assert await event_types(server, task_id) == [
        "queued",
        *["started", "waiting", "queued"] * 2,
        "started",
        "finished",
    ]


async def test_retrying_task_waits_for_its_due_time(jobs: Jobs) -> None:
    clock = Clock()
    server = await jobs.server(flaky_task, clock=clock)
    task_id = await server.task({"fail": 1}, max_attempts=2, retry=fixed(1000, cap=5000))
    retrying = await state_of(server, task_id, "retrying")
    assert retrying.attempts == 1
    assert retrying.error == "ValueError: boom on attempt 1"
    assert retrying.available_at == pytest.approx(clock() + 1000, abs=5)
    assert server.stats()["tasks"]["retrying"] == 1
    # Another task runs and ends meanwhile: the retrying one was not due, so it still waits.
    other = await server.task({"fail": 0})
    await state_of(server, other, "succeeded")
    assert (await server.get(task_id)).state.value == "retrying"
    clock.advance(1001, server)
    done = await state_of(server, task_id, "succeeded")
    assert done.attempts == 2
    assert done.error is None


# --- through HTTP ----------------------------------------------------------------------


async def test_http_retry_fields_and_the_event_stream(jobs: Jobs) -> None:
    client, _ = await jobs.client(flaky_task)
    policy = {"base": 0.05, "factor": 2, "cap": 1, "jitter": 0}
    created = await post(
        client, "/tasks", {"data": {"fail": 2}, "retry": policy, "max_attempts": 3}
    )
    task_id = created["id"]
    response = await client.get(f"/tasks/{task_id}/events")
    stream = await sse(response).collect()
    events = [orjson.loads(e.data) for e in stream]
    assert [e.event for e in stream] == [
        "queued",
        *["started", "retrying", "queued"] * 2,
        "started",
        "finished",
    ]
    assert [e["delay"] for e in retry_events(events)] == [0.05, 0.1]
    assert all(e["error"].startswith("ValueError: boom") for e in retry_events(events))
    check_due_times_kept(events)
    task = await get_json(client, f"/tasks/{task_id}")
    assert task["state"] == "succeeded"
    assert task["attempts"] == 3
    assert task["max_attempts"] == 3
    assert task["retry"] == {"base": 0.05, "factor": 2, "cap": 1, "jitter": 0}


async def test_http_retrying_state_is_visible_with_its_due_time(jobs: Jobs) -> None:
    clock = Clock()
    client, server = await jobs.client(flaky_task, clock=clock)
    created = await post(
        client, "/tasks", {"data": {"fail": 1}, "max_attempts": 2, "retry": {"base": 500}}
    )

    async def retrying() -> dict[str, Any] | None:
        task = await get_json(client, f"/tasks/{created['id']}")
        return task if task["state"] == "retrying" else None

    task = await wait_for(retrying)
    # The default jitter (0.1) spreads the 500 s base by at most 10%.
    assert 450 - 5 <= task["available_at"] - clock() <= 550
    clock.advance(600, server)
    done = await get_json(client, f"/tasks/{created['id']}?wait=10")
    assert done["state"] == "succeeded"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ('"retry": {"base": -1}', "retry.base"),
        ('"retry": {"factor": 0.5}', "retry.factor"),
        ('"retry": {"cap": "long"}', "retry.cap"),
        ('"retry": {"jitter": 2}', "retry.jitter"),
        ('"retry": {"bogus": 1}', "retry.bogus"),
        ('"retry": 5', "retry"),
        ('"max_attempts": 0', "max_attempts"),
        ('"max_attempts": 1.5', "max_attempts"),
        ('"max_attempts": "3"', "max_attempts"),
        ('"max_attempts": 1001', "max_attempts"),
    ],
)
async def test_http_bad_retry_values_are_refused_and_nothing_is_written(
    jobs: Jobs, options: str, field: str
) -> None:
    client, server = await jobs.client(task_workers=0)
    response = await client.post(
        "/tasks",
        data=f'{{"data": 1, {options}}}',
        headers={"Content-Type": "application/json"},
    )
    await refused(response, 422, field)
    assert await all_tasks(client) == []
    assert server.stats()["tasks"]["queued"] == 0


async def test_python_bad_retry_values_name_the_field(jobs: Jobs) -> None:
    server = await jobs.server(task_workers=0)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"retry": {"base": -1}}, "retry.base"),
        ({"retry": "fast"}, "retry"),
        ({"max_attempts": 0}, "max_attempts"),
    ]
    for options, field in cases:
        with pytest.raises(ValidationError) as caught:
            await server.task(1, **options)
        assert caught.value.field == field
    assert await server.list_tasks() == []
    # A dict is accepted as well as a RetryPolicy.
    task_id = await server.task(1, retry={"base": 0.5, "jitter": 0})
    assert (await server.get(task_id)).retry == RetryPolicy(base=0.5, jitter=0.0)


async def test_callback_raising_timeout_error_without_a_timeout(jobs: Jobs) -> None:
    async def task(ctx: TaskContext) -> Any:
        if ctx.data == "upstream":
            raise TimeoutError("the upstream API did not answer")
        return ctx.data

    server = await jobs.server(task, task_workers=1)
    failing = await server.task("upstream", max_attempts=1)
    failed = await state_of(server, failing, "failed", timeout=3)
    assert failed.error is not None
    assert failed.error.startswith("TimeoutError")
    # The only worker is still there.
    assert await server.task_wait("next", 3) == "next"


async def test_http_retry_later_streams_a_waiting_event(jobs: Jobs) -> None:
    calls: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        calls.append(ctx.attempt)
        if len(calls) == 1:
            raise RetryLater(0.05)
        return len(calls)

    client, _ = await jobs.client(task)
    created = await post(client, "/tasks", {"data": None, "max_attempts": 1})
    stream = await sse(await client.get(f"/tasks/{created['id']}/events")).collect()
    assert [e.event for e in stream] == [
        "queued",
        "started",
        "waiting",
        "queued",
        "started",
        "finished",
    ]
    waiting = orjson.loads(stream[2].data)
    assert waiting["state"] == "waiting"
    assert waiting["available_at"] == pytest.approx(waiting["at"] + 0.05, abs=0.02)
    assert orjson.loads(stream[4].data)["at"] >= waiting["available_at"]
    task_json = await get_json(client, f"/tasks/{created['id']}")
    assert (task_json["state"], task_json["attempts"], task_json["result"]) == ("succeeded", 1, 2)


async def test_a_timed_out_attempt_is_retried(jobs: Jobs) -> None:
    errors: list[BaseException] = []

    async def task(ctx: TaskContext) -> Any:
        if ctx.attempt == 1:
            await asyncio.sleep(10)
        return ctx.attempt

    async def on_error(ctx: TaskContext, exc: BaseException) -> None:
        errors.append(exc)

    def configure(server: TaskServer) -> None:
        server.on("error", on_error)

    server = await jobs.server(task, configure=configure)
    task_id = await server.task(None, timeout=0.1, max_attempts=2, retry=fixed(0.01))
    done = await state_of(server, task_id, "succeeded")
    assert done.result == 2
    events = await stored_events(server, task_id)
    assert retry_events(events)[0]["error"] == (
        "TimeoutError: the task ran longer than its timeout of 0.1s"
    )
    assert len(errors) == 1
    assert isinstance(errors[0], TimeoutError)


async def test_cancelling_a_retrying_task_ends_it_for_good(jobs: Jobs) -> None:
    clock = Clock()
    client, server = await jobs.client(flaky_task, clock=clock)
    created = await post(
        client, "/tasks", {"data": {"fail": 1}, "max_attempts": 3, "retry": {"base": 500}}
    )
    await state_of(server, created["id"], "retrying")
    response = await client.delete(f"/tasks/{created['id']}")
    assert response.status == 200, await response.text()
    assert (await response.json())["state"] == "cancelled"
    clock.advance(1000, server)
    barrier = await server.task({})
    await state_of(server, barrier, "succeeded")
    task = await server.get(created["id"])
    assert task.state.value == "cancelled"
    assert task.attempts == 1
    assert (await event_types(server, created["id"]))[-1] == "cancelled"
