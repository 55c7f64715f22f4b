"""The worker pool: three kinds of callback, the context they get, and every kind of outcome."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from taskserver import (
    PermanentError,
    SyncTaskContext,
    Task,
    TaskContext,
    TaskServer,
)

from . import helpers
from .conftest import ServerFactory, wait_for

#: Retry at once: these tests are about outcomes, not about the backoff schedule.
NO_BACKOFF: dict[str, Any] = {"retry_base": 0.0, "retry_jitter": 0.0}


async def finished(server: TaskServer, task_id: int) -> Task:
    return await server.wait_terminal(task_id, timeout=15)


async def event_types(server: TaskServer, task_id: int) -> list[str]:
    return [str(e.type) for e in await server.events_after(0, task_id=task_id)]


# --- the three kinds of callback ----------------------------------------------------------


async def test_async_callback_runs_on_the_loop(make_server: ServerFactory) -> None:
    loop = asyncio.get_running_loop()
    seen: dict[str, Any] = {}

    async def task(ctx: TaskContext) -> Any:
        seen["on_loop"] = asyncio.get_running_loop() is loop
        seen["main_thread"] = threading.current_thread() is threading.main_thread()
        seen["ctx"] = (ctx.id, ctx.data, ctx.attempt, ctx.worker_id)
        await ctx.progress(0.5, "half way")
        # `await ctx.progress` returns once stored: a separate connection sees it now.
        seen["stored"] = helpers.stored_progress_events(server.settings.db, ctx.id)
        return {"ok": ctx.data}

    server = await make_server(task=task)
    task_id = await server.task({"n": 7})
    done = await finished(server, task_id)
    assert done.state == "succeeded"
    assert done.result == {"ok": {"n": 7}}
    assert seen["on_loop"]
    assert seen["main_thread"]
    assert seen["ctx"][:3] == (task_id, {"n": 7}, 1)
    assert seen["ctx"][3] in range(server.settings.task_workers)
    assert len(seen["stored"]) == 1
    progress = orjson.loads(seen["stored"][0][1])
    assert (progress["progress"], progress["message"]) == (0.5, "half way")
    assert await event_types(server, task_id) == ["queued", "started", "progress", "finished"]


async def test_plain_function_runs_in_a_thread(make_server: ServerFactory) -> None:
    seen: dict[str, Any] = {}

    def task(ctx: SyncTaskContext) -> Any:
        seen["thread"] = threading.current_thread()
        seen["ctx"] = (ctx.id, ctx.data, ctx.attempt, ctx.worker_id)
        ctx.progress(0.25, "a quarter")
        # ctx.progress blocks this thread until the event is stored.
        seen["stored"] = helpers.stored_progress_events(server.settings.db, ctx.id)
        ctx.progress(1.0)
        return [ctx.data, "done"]

    server = await make_server(task=task)
    task_id = await server.task("payload")
    done = await finished(server, task_id)
    assert done.state == "succeeded", done.error
    assert done.result == ["payload", "done"]
    assert seen["thread"] is not threading.main_thread()
    assert seen["ctx"][:3] == (task_id, "payload", 1)
    assert seen["ctx"][3] in range(server.settings.task_workers)
    assert len(seen["stored"]) == 1
    assert orjson.loads(seen["stored"][0][1])["progress"] == 0.25
    assert done.progress == 1.0
    assert await event_types(server, task_id) == [
        "queued",
        "started",
        "progress",
        "progress",
        "finished",
    ]


async def test_cpu_bound_callback_runs_in_another_process(make_server: ServerFactory) -> None:
    server = await make_server(task=helpers.cpu_task, cpu_bound=True, process_workers=1)
    task_id = await server.task({"db": server.settings.db, "n": 3})
    done = await finished(server, task_id)
    assert done.state == "succeeded", done.error
    result = done.result
    assert result["pid"] != os.getpid()
    assert result["id"] == task_id
    assert result["data"] == {"db": server.settings.db, "n": 3}
    assert result["attempt"] == 1
    assert result["worker_id"] in range(server.settings.task_workers)
    assert result["progress_stored"] is True  # fire-and-forget progress still arrives
    types = await event_types(server, task_id)
    assert types == ["queued", "started", "progress", "finished"]


async def test_finish_gets_the_result_in_the_server_process(make_server: ServerFactory) -> None:
    calls: list[tuple[int, Any, bool]] = []

    async def task(ctx: TaskContext) -> Any:
        return {"sum": sum(ctx.data)}

    async def finish(ctx: TaskContext, result: Any) -> None:
        calls.append((ctx.id, result, threading.current_thread() is threading.main_thread()))

    server = await make_server(task=task, finish=finish)
    task_id = await server.task([1, 2, 3])
    assert (await finished(server, task_id)).state == "succeeded"
    assert calls == [(task_id, {"sum": 6}, True)]


async def test_plain_finish_runs_in_a_thread(make_server: ServerFactory) -> None:
    threads: list[bool] = []

    def finish(ctx: SyncTaskContext, result: Any) -> None:
        threads.append(threading.current_thread() is threading.main_thread())

    server = await make_server(finish=finish)
    assert (await finished(server, await server.task(1))).state == "succeeded"
    assert threads == [False]


async def test_bad_progress_fraction_fails_the_task(make_server: ServerFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        await ctx.progress(1.5)
        return None

    server = await make_server(task=task)
    done = await finished(server, await server.task(None))
    assert done.state == "failed"
    assert done.error is not None
    assert "progress" in done.error


# --- failures -------------------------------------------------------------------------------


def failing_sync(ctx: SyncTaskContext) -> Any:
    raise ValueError("boom")


async def failing_async(ctx: TaskContext) -> Any:
    raise ValueError("boom")


@pytest.mark.parametrize("task", [failing_async, failing_sync], ids=["async", "thread"])
async def test_exception_fails_with_error_and_traceback(
    make_server: ServerFactory, task: Any
) -> None:
    finishes: list[int] = []

    async def finish(ctx: TaskContext, result: Any) -> None:
        finishes.append(ctx.id)

    server = await make_server(task=task, finish=finish)
    task_id = await server.task(None)
    done = await finished(server, task_id)
    assert done.state == "failed"
    assert done.error == "ValueError: boom"
    assert done.traceback is not None
    assert "Traceback" in done.traceback
    assert task.__name__ in done.traceback
    assert "ValueError: boom" in done.traceback
    assert done.result is None
    assert done.attempts == 1
    assert await event_types(server, task_id) == ["queued", "started", "failed"]
    assert finishes == []


async def test_timeout_fails_an_async_task(make_server: ServerFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        await asyncio.Event().wait()

    server = await make_server(task=task)
    task_id = await server.task(None, timeout=0.2)
    done = await finished(server, task_id)
    assert done.state == "failed"
    assert done.error is not None
    assert "timeout" in done.error.lower()
    assert done.finished_at is not None
    assert done.started_at is not None
    assert done.finished_at - done.started_at >= 0.2


async def test_timeout_fails_a_thread_task(make_server: ServerFactory) -> None:
    released = threading.Event()

    def task(ctx: SyncTaskContext) -> Any:
        for _ in range(500):  # bounded: gives up after ~5 s
            if ctx.cancelled:
                break
            released.wait(0.01)
        return "too late"

    server = await make_server(task=task, default_timeout=0.2)
    done = await finished(server, await server.task(None))
    released.set()
    assert done.state == "failed"
    assert done.error is not None
    assert "timeout" in done.error.lower()
    assert done.result is None


async def test_retries_until_success(make_server: ServerFactory) -> None:
    attempts: list[int] = []

    async def task(ctx: TaskContext) -> Any:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"flaky {ctx.attempt}")
        return {"attempt": ctx.attempt}

    server = await make_server(task=task, **NO_BACKOFF)
    task_id = await server.task(None, max_attempts=3)
    done = await finished(server, task_id)
    assert done.state == "succeeded"
    assert done.attempts == 3
    assert done.result == {"attempt": 3}
    assert done.error is None
    assert attempts == [1, 2, 3]
    types = await event_types(server, task_id)
    assert types.count("retrying") == 2
    assert types.count("started") == 3
    assert types[-1] == "finished"
    retrying = [
        e.data for e in await server.events_after(0, task_id=task_id) if e.type == "retrying"
    ]
    assert [r["error"] for r in retrying] == ["RuntimeError: flaky 1", "RuntimeError: flaky 2"]


async def test_retries_run_out(make_server: ServerFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        raise RuntimeError(f"attempt {ctx.attempt}")

    server = await make_server(task=task, **NO_BACKOFF)
    task_id = await server.task(None, max_attempts=2)
    done = await finished(server, task_id)
    assert done.state == "failed"
    assert done.attempts == 2
    assert done.error == "RuntimeError: attempt 2"
    types = await event_types(server, task_id)
    assert types.count("retrying") == 1
    assert types[-1] == "failed"


async def test_permanent_error_fails_at_once(make_server: ServerFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        raise PermanentError("never going to work")

    server = await make_server(task=task)
    task_id = await server.task(None, max_attempts=5)
    done = await finished(server, task_id)
    assert done.state == "failed"
    assert done.attempts == 1
    assert done.error is not None
    assert "never going to work" in done.error
    assert "retrying" not in await event_types(server, task_id)


async def test_default_max_attempts_applies(make_server: ServerFactory) -> None:
    async def task(ctx: TaskContext) -> Any:
        if ctx.attempt < 2:
            raise RuntimeError("first time")
        return ctx.attempt

    server = await make_server(task=task, default_max_attempts=2, **NO_BACKOFF)
    done = await finished(server, await server.task(None))
    assert (done.state, done.attempts, done.result) == ("succeeded", 2, 2)


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_finish_error_is_recorded_and_the_server_lives_on(
    make_server: ServerFactory, kind: str
) -> None:
    async def async_finish(ctx: TaskContext, result: Any) -> None:
        if ctx.data == "bad":
            raise KeyError("missing thing")

    def sync_finish(ctx: SyncTaskContext, result: Any) -> None:
        if ctx.data == "bad":
            raise KeyError("missing thing")

    server = await make_server(finish=async_finish if kind == "async" else sync_finish)
    bad = await finished(server, await server.task("bad"))
    assert bad.state == "succeeded"
    assert bad.result == {"echo": "bad"}
    assert bad.finish_error is not None
    assert "KeyError" in bad.finish_error
    assert "missing thing" in bad.finish_error
    good = await finished(server, await server.task("good"))
    assert good.state == "succeeded"
    assert good.finish_error is None
    assert server.accepting


@pytest.mark.parametrize(
    "value", [object(), {"set": {1, 2}}, b"bytes"], ids=["object", "set", "bytes"]
)
async def test_unserialisable_result_fails_clearly(make_server: ServerFactory, value: Any) -> None:
    async def task(ctx: TaskContext) -> Any:
        return value if ctx.data == "bad" else "fine"

    server = await make_server(task=task)
    task_id = await server.task("bad")
    done = await finished(server, task_id)
    assert done.state == "failed"
    assert done.result is None
    assert done.error is not None
    assert "JSON" in done.error
    assert (await event_types(server, task_id))[-1] == "failed"
    # Nothing else broke: the next task succeeds.
    ok = await finished(server, await server.task("ok"))
    assert (ok.state, ok.result) == ("succeeded", "fine")


async def test_thread_progress_after_cancel_changes_nothing(make_server: ServerFactory) -> None:
    go = threading.Event()
    returned = threading.Event()

    def task(ctx: SyncTaskContext) -> Any:
        ctx.progress(0.1, "before")
        go.wait(10)
        # A thread does not stop when its task is cancelled; it reports on, unaware.
        with contextlib.suppress(Exception):
            ctx.progress(0.9, "after the cancel")
        returned.set()
        return "late"

    server = await make_server(task=task, task_workers=1)
    task_id = await server.task(None)
    await wait_for(lambda: helpers.stored_progress_events(server.settings.db, task_id))
    assert (await server.cancel(task_id)).state == "cancelled"
    go.set()
    await wait_for(returned.is_set, message="the thread returned")
    # The next task runs on the same single thread, so the late call is surely over.
    assert (await finished(server, await server.task("next"))).state == "succeeded"
    types = await event_types(server, task_id)
    assert types[-1] == "cancelled", types
    cancelled = await server.get(task_id)
    assert cancelled.state == "cancelled"
    assert (cancelled.progress, cancelled.message) == (0.1, "before")


async def test_thread_progress_after_timeout_changes_nothing(make_server: ServerFactory) -> None:
    go = threading.Event()
    returned = threading.Event()

    def task(ctx: SyncTaskContext) -> Any:
        if ctx.data == "next":
            return "next"
        ctx.progress(0.1, "before")
        go.wait(10)
        with contextlib.suppress(Exception):
            ctx.progress(0.9, "after the timeout")
        returned.set()
        return "late"

    server = await make_server(task=task, task_workers=1)
    task_id = await server.task(None, timeout=1.5)  # its first progress is stored by then
    timed_out = await finished(server, task_id)
    assert timed_out.state == "failed"
    go.set()
    await wait_for(returned.is_set, message="the thread returned")
    assert (await finished(server, await server.task("next"))).state == "succeeded"
    types = await event_types(server, task_id)
    assert types[-1] == "failed", types
    after = await server.get(task_id)
    assert (after.state, after.progress, after.message) == ("failed", 0.1, "before")
    assert after.result is None


async def test_cancel_running_process_task_discards_result(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    server = await make_server(
        task=helpers.cpu_wait_for_file, cpu_bound=True, process_workers=1, task_workers=1
    )
    gate = tmp_path / "gate"
    task_id = await server.task({"until_file": str(gate)})
    await wait_for(lambda: server.stats()["running"] == 1, message="the process task runs")
    assert (await server.cancel(task_id)).state == "cancelled"
    gate.touch()  # the process finishes its work anyway; the result must go nowhere
    # One pool process: once the next task ran, the cancelled one has surely returned.
    after = await finished(server, await server.task({"until_file": str(gate)}))
    assert after.state == "succeeded"
    cancelled = await server.get(task_id)
    assert (cancelled.state, cancelled.result) == ("cancelled", None)
    assert (await event_types(server, task_id))[-1] == "cancelled"
