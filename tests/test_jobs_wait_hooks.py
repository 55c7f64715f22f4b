"""Waiting for outcomes (``task_wait``, ``wait``, ``GET /tasks/{id}?wait=``) and the
``before`` / ``after`` / ``error`` hooks around every task.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from taskserver import (
    ConfigError,
    Settings,
    SyncTaskContext,
    TaskContext,
    TaskNotFound,
    TaskServer,
)
from taskserver.errors import TaskCancelled, TaskFailed

from .conftest import wait_for
from .jobs_harness import Gate, Jobs, get_json, post, refused, state_of


@pytest.fixture
async def jobs(settings: Settings, aiohttp_client: Any) -> AsyncIterator[Jobs]:
    async with Jobs(settings, aiohttp_client) as harness:
        yield harness


class Work:
    """Task callback: ``{"sleep": s}``, ``{"fail": msg}``, ``{"hold": True}`` (until the gate)."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.started: list[int] = []
        self.raised: dict[int, BaseException] = {}

    async def run(self, ctx: TaskContext) -> Any:
        self.started.append(ctx.id)
        data = ctx.data if isinstance(ctx.data, dict) else {}
        if data.get("hold"):
            assert await self.gate.wait()
        await asyncio.sleep(data.get("sleep", 0))
        if "fail" in data:
            exc = ValueError(data["fail"])
            self.raised[ctx.id] = exc
            raise exc
        return {"done": ctx.id}


# --- task_wait / wait --------------------------------------------------------------------


async def test_task_wait_returns_the_result(jobs: Jobs) -> None:
    work = Work()
    server = await jobs.server(work.run)
    result = await server.task_wait({"sleep": 0.01}, 5)
    assert result == {"done": work.started[0]}


async def test_task_wait_raises_task_failed(jobs: Jobs) -> None:
    server = await jobs.server(Work().run)
    with pytest.raises(TaskFailed) as caught:
        await server.task_wait({"fail": "no such user"}, 5, max_attempts=1)
    assert caught.value.error == "ValueError: no such user"
    task = await server.get(caught.value.task_id)
    assert task.state.value == "failed"


async def test_task_wait_raises_task_cancelled(jobs: Jobs) -> None:
    work = Work()
    server = await jobs.server(work.run)
    waiting = asyncio.create_task(server.task_wait({"hold": True}, 5))
    await wait_for(lambda: work.started)
    await server.cancel(work.started[0])
    with pytest.raises(TaskCancelled) as caught:
        await waiting
    assert caught.value.task_id == work.started[0]


async def test_task_wait_times_out_and_the_task_keeps_running(jobs: Jobs) -> None:
    work = Work()
    server = await jobs.server(work.run)
    with pytest.raises(TimeoutError) as caught:
        await server.task_wait({"hold": True}, 0.2)
    task_id = work.started[0]
    assert f"task {task_id}" in " ".join(getattr(caught.value, "__notes__", []))
    assert (await server.get(task_id)).state.value == "running"
    work.gate.open()
    assert (await state_of(server, task_id, "succeeded")).result == {"done": task_id}


async def test_wait_for_many_returns_results_in_the_order_asked(jobs: Jobs) -> None:
    server = await jobs.server(Work().run, task_workers=3)
    slow = await server.task({"sleep": 0.1})
    fast = await server.task({"sleep": 0})
    ended = await server.task({})
    await state_of(server, ended, "succeeded")
    assert await server.wait([slow, fast, ended], 5) == [
        {"done": slow},
        {"done": fast},
        {"done": ended},
    ]


async def test_wait_for_many_raises_for_a_failure_a_timeout_or_an_unknown_id(jobs: Jobs) -> None:
    work = Work()
    server = await jobs.server(work.run, task_workers=2)
    ok = await server.task({})
    bad = await server.task({"fail": "broken"})
    with pytest.raises(TaskFailed) as caught:
        await server.wait([ok, bad], 5)
    assert caught.value.task_id == bad
    held = await server.task({"hold": True})
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await server.wait([ok, held], 0.2)
    assert time.monotonic() - started < 2
    with pytest.raises(TaskNotFound):
        await server.wait([ok, 9999], 1)
    work.gate.open()
    assert await server.wait([held], 5) == [{"done": held}]


# --- GET /tasks/{id}?wait= -----------------------------------------------------------------


async def test_http_wait_long_polls_until_the_task_ends(jobs: Jobs) -> None:
    client, _ = await jobs.client(Work().run)
    started = time.monotonic()  # before the task exists: its 0.3 s all come after
    created = await post(client, "/tasks", {"data": {"sleep": 0.3}})
    task = await get_json(client, f"/tasks/{created['id']}?wait=5")
    elapsed = time.monotonic() - started
    assert task["state"] == "succeeded"
    assert task["result"] == {"done": created["id"]}
    assert 0.3 <= elapsed < 4, elapsed
    # Without wait, or once ended, the answer is immediate (not after the wait's 5 s).
    started = time.monotonic()
    assert (await get_json(client, f"/tasks/{created['id']}?wait=5"))["state"] == "succeeded"
    assert time.monotonic() - started < 4


async def test_http_wait_returns_the_current_state_after_the_wait(jobs: Jobs) -> None:
    work = Work()
    client, _ = await jobs.client(work.run)
    created = await post(client, "/tasks", {"data": {"hold": True}})
    started = time.monotonic()
    task = await get_json(client, f"/tasks/{created['id']}?wait=1")
    elapsed = time.monotonic() - started
    assert task["state"] == "running"
    assert 0.9 <= elapsed < 3, elapsed
    work.gate.open()
    assert (await get_json(client, f"/tasks/{created['id']}?wait=5"))["state"] == "succeeded"


async def test_http_wait_on_a_failing_task_returns_it_failed(jobs: Jobs) -> None:
    client, _ = await jobs.client(Work().run)
    created = await post(client, "/tasks", {"data": {"sleep": 0.1, "fail": "nope"}})
    task = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert task["state"] == "failed"
    assert task["error"] == "ValueError: nope"


@pytest.mark.parametrize("wait", ["abc", "-1", "61", "1.5"])
async def test_http_bad_wait_is_refused(jobs: Jobs, wait: str) -> None:
    client, _ = await jobs.client(task_workers=0)
    created = await post(client, "/tasks", {"data": 1})
    await refused(await client.get(f"/tasks/{created['id']}?wait={wait}"), 422, "wait")


async def test_http_wait_on_an_unknown_task_is_404(jobs: Jobs) -> None:
    client, _ = await jobs.client(task_workers=0)
    await refused(await client.get("/tasks/4242?wait=2"), 404, "id")


# --- hooks --------------------------------------------------------------------------------


class Hooks:
    """Records every hook call as (hook, task id, data, attempt, worker, extra argument)."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, int, Any, int, int, Any]] = []
        self.fail = fail or set()

    def note(self, name: str, ctx: TaskContext | SyncTaskContext, arg: Any = None) -> None:
        self.calls.append((name, ctx.id, ctx.data, ctx.attempt, ctx.worker_id, arg))
        if name in self.fail:
            raise RuntimeError(f"{name} hook broke")

    def install(self, server: TaskServer) -> None:
        async def before(ctx: TaskContext) -> None:
            self.note("before", ctx)

        async def after(ctx: TaskContext, result: Any) -> None:
            self.note("after", ctx, result)

        async def error(ctx: TaskContext, exc: BaseException) -> None:
            self.note("error", ctx, exc)

        server.on("before", before)
        server.on("after", after)
        server.on("error", error)

    def install_sync(self, server: TaskServer) -> None:
        def before(ctx: SyncTaskContext) -> None:
            self.note("before", ctx)

        def after(ctx: SyncTaskContext, result: Any) -> None:
            self.note("after", ctx, result)

        def error(ctx: SyncTaskContext, exc: BaseException) -> None:
            self.note("error", ctx, exc)

        server.on("before", before)
        server.on("after", after)
        server.on("error", error)


@pytest.mark.parametrize("kind", ["async", "thread"])
async def test_hooks_run_around_every_task_with_its_context(jobs: Jobs, kind: str) -> None:
    hooks = Hooks()
    work = Work()
    seen: list[tuple[int, Any, int, int]] = []

    async def task(ctx: TaskContext) -> Any:
        seen.append((ctx.id, ctx.data, ctx.attempt, ctx.worker_id))
        return await work.run(ctx)

    install = hooks.install if kind == "async" else hooks.install_sync
    server = await jobs.server(task, configure=install, task_workers=1)
    ok = await server.task({"n": 1})
    await state_of(server, ok, "succeeded")
    bad = await server.task({"fail": "bad input"}, max_attempts=2, retry={"base": 0, "jitter": 0})
    await state_of(server, bad, "failed")

    by_task = {task_id: [c for c in hooks.calls if c[1] == task_id] for task_id in (ok, bad)}
    assert [c[0] for c in by_task[ok]] == ["before", "after"]
    assert [c[0] for c in by_task[bad]] == ["before", "error", "before", "error"]
    # The same context as the task callback: id, data, attempt and worker.
    for name, task_id, data, attempt, worker, _ in hooks.calls:
        assert (task_id, data, attempt, worker) in seen, name
    assert by_task[ok][1][5] == {"done": ok}
    errors = [c[5] for c in by_task[bad] if c[0] == "error"]
    assert all(isinstance(e, ValueError) and str(e) == "bad input" for e in errors)
    assert errors[-1] is work.raised[bad]
    assert [c[3] for c in by_task[bad]] == [1, 1, 2, 2]
    assert (await server.get(ok)).hook_error is None


async def test_a_failing_hook_is_recorded_and_the_worker_keeps_going(jobs: Jobs) -> None:
    hooks = Hooks(fail={"before", "after"})
    server = await jobs.server(Work().run, configure=hooks.install, task_workers=1)
    first = await server.task({})
    done = await state_of(server, first, "succeeded")
    assert done.result == {"done": first}
    assert done.hook_error is not None
    assert "before hook: RuntimeError: before hook broke" in done.hook_error
    assert "after hook: RuntimeError: after hook broke" in done.hook_error
    # The only worker keeps taking tasks.
    assert await server.task_wait({}, 5) is not None
    failing = await server.task({"fail": "x"})
    failed = await state_of(server, failing, "failed")
    assert failed.error == "ValueError: x"
    assert failed.hook_error is not None
    assert "before hook" in failed.hook_error


async def test_a_failing_error_hook_keeps_the_task_error(jobs: Jobs) -> None:
    hooks = Hooks(fail={"error"})
    server = await jobs.server(Work().run, configure=hooks.install, task_workers=1)
    failing = await server.task({"fail": "original"})
    failed = await state_of(server, failing, "failed")
    assert failed.error == "ValueError: original"
    assert failed.hook_error == "error hook: RuntimeError: error hook broke"
    assert await server.task_wait({}, 5) is not None


async def test_http_shows_hook_error(jobs: Jobs) -> None:
    hooks = Hooks(fail={"after"})
    client, _ = await jobs.client(Work().run, configure=hooks.install)
    created = await post(client, "/tasks", {"data": {}})
    task = await get_json(client, f"/tasks/{created['id']}?wait=5")
    assert task["state"] == "succeeded"
    assert task["hook_error"] == "after hook: RuntimeError: after hook broke"
    assert [c[0] for c in hooks.calls] == ["before", "after"]


async def test_hook_registration_errors(jobs: Jobs) -> None:
    server = TaskServer(Settings(task_workers=0))

    def hook(ctx: SyncTaskContext) -> None:
        return None

    with pytest.raises(ConfigError):
        server.on("around", hook)  # type: ignore[call-overload]
    with pytest.raises(ConfigError):
        server.on("before", hook, cpu_bound=True)
    started = await jobs.server(task_workers=0)
    with pytest.raises(ConfigError):
        started.on("before", hook)


class AsyncCallable:
    """A callable object whose ``__call__`` is ``async def`` (e.g. a configured handler)."""

    async def __call__(self, ctx: TaskContext) -> Any:
        await asyncio.sleep(0)
        return {"called": ctx.id}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_object_with_async_call_runs_as_a_coroutine(jobs: Jobs) -> None:
    server = await jobs.server(AsyncCallable())
    task_id = await server.task(None)
    try:
        done = await state_of(server, task_id, "succeeded", "failed")
    finally:
        gc.collect()  # an un-awaited coroutine warns now, under this test's filters
    assert done.error is None
    assert done.result == {"called": task_id}
