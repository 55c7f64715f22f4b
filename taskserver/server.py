"""``TaskServer``: wires the store, the ready queue, the worker pool and the hub.

Data flows one way::

    task() ─▶ Store (group commit) ─on_commit─▶ ReadyQueue ─▶ WorkerPool ─report─▶ Store
                                    └─────────▶ EventHub ─▶ SSE subscribers

The public surface is ``on()`` to register callbacks, ``task()`` to enqueue,
``get()`` / ``list_tasks()`` / ``cancel()`` / ``wait()`` / ``stats()`` to look and act,
and ``start()`` / ``stop()`` for the lifecycle (``app.py`` runs them in one
``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, TypeVar, overload

import orjson

from .config import Settings
from .errors import (
    ConfigError,
    Conflict,
    NotSerializable,
    ServerBusy,
    ServerClosed,
    TaskNotFound,
    ValidationError,
)
from .events import EventHub, Subscription
from .models import TERMINAL, TERMINAL_EVENTS, Event, EventType, Task, TaskState
from .ready import ReadyQueue
from .store import Committed, Store
from .workers import Callback, WorkerPool

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
CallbackName = Literal["task", "finish"]

#: Waiters for task outcomes (``wait``, ``cancel``) held at once; past it, ServerBusy.
MAX_WAITERS = 100_000


def encode_payload(data: Any, field: str = "data") -> tuple[str, Any]:
    """JSON-encode ``data`` and decode it back: what is stored and what a worker will see.

    Raises ``NotSerializable`` naming ``field`` before anything is written.
    """
    try:
        raw = orjson.dumps(data)
    except TypeError as exc:
        raise NotSerializable(f"{field} cannot be encoded as JSON: {exc}", field=field) from None
    return raw.decode(), orjson.loads(raw)


def _check_options(timeout: float | None, max_attempts: int | None) -> None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ValidationError("timeout must be a positive number of seconds", field="timeout")
    if max_attempts is not None and (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= 1000
    ):
        raise ValidationError(
            "max_attempts must be an integer from 1 to 1000", field="max_attempts"
        )


class TaskServer:
    """A task server: register callbacks with ``on()``, then ``start()``.

    ``clock`` returns seconds since the epoch; tests inject their own.
    """

    def __init__(
        self, settings: Settings | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings or Settings()
        self._clock = clock
        self._callbacks: dict[str, Callback] = {}
        self.hub: EventHub[Event] = EventHub(
            max_subscribers=self.settings.max_subscribers,
            buffer_size=self.settings.subscriber_queue,
        )
        self._store: Store | None = None
        self._pool: WorkerPool | None = None
        self._ready = ReadyQueue(self.settings.ready_window, self._page_in, self._is_running)
        self._counts: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._n_waiters = 0
        self._closing = False
        self._started = False
        self._topic_prefix = f"{self.settings.public_url}/tasks/"

    def __repr__(self) -> str:
        state = "closing" if self._closing else ("running" if self._started else "idle")
        return (
            f"<TaskServer {state} workers={self.settings.task_workers} "
            f"queued={self._counts[TaskState.QUEUED]} ready={len(self._ready)}>"
        )

    @property
    def accepting(self) -> bool:
        """True while ``task()`` takes new tasks."""
        return self._started and not self._closing

    # --- setup ---------------------------------------------------------------

    @overload
    def on(
        self, event: CallbackName, fn: None = None, *, cpu_bound: bool = False
    ) -> Callable[[F], F]: ...

    @overload
    def on(self, event: CallbackName, fn: F, *, cpu_bound: bool = False) -> F: ...

    def on(
        self, event: CallbackName, fn: F | None = None, *, cpu_bound: bool = False
    ) -> F | Callable[[F], F]:
        """Register the ``task`` or ``finish`` callback, as Swoole's ``$server->on()``.

        Use as ``server.on("task", handler)`` or as a decorator. Registering a
        second callback for the same event replaces the first. ``task(ctx)``
        returns the result (JSON-encodable); ``finish(ctx, result)`` then runs in
        this process. ``async def`` runs on the loop, a plain function in a
        thread, a plain ``task`` function with ``cpu_bound=True`` in a process.
        """
        if event not in ("task", "finish"):
            raise ConfigError(f"unknown callback {event!r}: use 'task' or 'finish'")
        if cpu_bound and event == "finish":
            raise ConfigError(
                "the finish callback runs in the server process; cpu_bound applies to 'task' only"
            )
        if self._started:
            raise ConfigError("callbacks must be registered before the server starts")

        def register(callback: F) -> F:
            try:
                self._callbacks[event] = Callback.of(callback, cpu_bound=cpu_bound)
            except TypeError as exc:
                raise ConfigError(f"{event} callback: {exc}") from None
            return callback

        return register if fn is None else register(fn)

    def check(self) -> None:
        """Raise ``ConfigError`` when workers are configured but a callback is missing."""
        if self.settings.task_workers > 0:
            missing = [name for name in ("task", "finish") if name not in self._callbacks]
            if missing:
                raise ConfigError(
                    f"--task-workers is {self.settings.task_workers} but no "
                    f"{' and no '.join(repr(m) for m in missing)} callback is registered: "
                    f"call server.on({missing[0]!r}, ...) in your setup function"
                )

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Open the store (recovering dead work), start the workers, page in the backlog."""
        self.check()
        if self._started:
            raise RuntimeError("TaskServer.start() called twice")
        self._store = Store(
            self.settings.db,
            synchronous=self.settings.synchronous,
            max_pending_writes=self.settings.max_pending_writes,
            on_commit=self._committed,
            clock=self._clock,
        )
        await self._store.open()
        self._counts = await self._store.count_by_state()
        if self.settings.task_workers > 0:
            self._pool = WorkerPool(
                self.settings.task_workers,
                get=self._ready.get,
                report=self._report,
                progress=self._record_progress,
                task=self._callbacks["task"],
                finish=self._callbacks["finish"],
                process_workers=self.settings.process_workers,
                clock=self._clock,
            )
            self._pool.start()
        self._started = True
        self._closing = False
        if self._counts[TaskState.QUEUED]:
            self._ready.start_from_disk()
        log.info(
            "taskserver started: %d workers, %d queued, db %s",
            self.settings.task_workers,
            self._counts[TaskState.QUEUED],
            self.settings.db,
        )

    def close_streams(self) -> None:
        """End every open event stream (first step of a shutdown)."""
        self.hub.close()

    async def stop(self) -> None:
        """Stop: refuse new tasks, give running ones the grace period, re-queue the rest.

        Whatever is queued stays queued on disk for the next start.
        """
        if not self._started:
            return
        self._closing = True
        self.hub.close()
        if self._pool is not None:
            interrupted = await self._pool.stop(self.settings.grace_period)
            assert self._store is not None
            for task in interrupted:
                # Not the task's fault: hand the attempt back.
                task.state = TaskState.QUEUED
                task.attempts = max(0, task.attempts - 1)
                task.started_at = None
                self._store.update_task(task, EventType.QUEUED, {"interrupted": True})
            if interrupted:
                log.warning(
                    "re-queued %d tasks still running after the %gs grace period",
                    len(interrupted),
                    self.settings.grace_period,
                )
        for futures in self._waiters.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ServerClosed("the server is stopping"))
                    future.exception()
        self._waiters.clear()
        if self._store is not None:
            await self._store.close()
        self._started = False

    # --- enqueue ---------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise ServerClosed("the task server is not running")
        return self._store

    def _admit(self, count: int) -> Store:
        if self._closing or not self._started:
            raise ServerClosed("the server is not accepting tasks (stopping or not started)")
        if self._counts[TaskState.QUEUED] + count > self.settings.max_queued:
            raise ServerBusy(
                f"{self._counts[TaskState.QUEUED]} tasks are queued, the limit is "
                f"{self.settings.max_queued}",
                retry_after=5.0,
            )
        return self.store

    async def task(
        self, data: Any, *, timeout: float | None = None, max_attempts: int | None = None
    ) -> int:
        """Enqueue one task and return its id once the task is durable.

        ``data`` must be JSON-encodable (``NotSerializable`` otherwise, nothing
        written); ``timeout`` (seconds) and ``max_attempts`` default to the
        settings. Raises ``ServerBusy`` when the queue or the write buffer is
        full and ``ServerClosed`` while stopping. Ids increase.
        """
        _check_options(timeout, max_attempts)
        payload = encode_payload(data)
        store = self._admit(1)
        tasks, committed = store.insert_tasks(
            (payload,),
            max_attempts=max_attempts or self.settings.default_max_attempts,
            timeout=timeout or self.settings.default_timeout or None,
        )
        self._counts[TaskState.QUEUED] += 1
        await asyncio.shield(committed)
        return tasks[0].id

    def topic(self, task_id: int) -> str:
        """The topic (an IRI) on which a task's events are published."""
        return f"{self._topic_prefix}{task_id}"

    # --- look and act ------------------------------------------------------------

    async def get(self, task_id: int) -> Task:
        """The task's committed state; ``TaskNotFound`` when there is none."""
        task = await self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def list_tasks(
        self, *, state: TaskState | None = None, after: int = 0, limit: int = 100
    ) -> list[Task]:
        """One page of tasks in id order, ids above ``after``."""
        return await self.store.list_tasks(state=state, after=after, limit=limit)

    async def cancel(self, task_id: int) -> Task:
        """Cancel a queued or running task and return it, cancelled.

        Raises ``TaskNotFound``, or ``Conflict`` when it has already ended.
        """
        store = self.store
        if self._pool is not None and self._pool.cancel(task_id):
            await self.wait_terminal(task_id, timeout=self.settings.grace_period + 5)
            return await self.get(task_id)
        task = self._ready.remove(task_id)
        if task is not None:
            task.state = TaskState.CANCELLED
            task.finished_at = self._clock()
            self._counts[TaskState.QUEUED] -= 1
            self._counts[TaskState.CANCELLED] += 1
            await asyncio.shield(store.update_task(task, EventType.CANCELLED))
            return task
        self._ready.tombstone(task_id)
        try:
            changed = await asyncio.shield(store.cancel_pending(task_id))
        finally:
            self._ready.untombstone(task_id)
        current = await self.get(task_id)
        if not changed and current.state in TERMINAL:
            raise Conflict(f"task {task_id} has already ended ({current.state.value})")
        if not changed:
            raise Conflict(f"task {task_id} is {current.state.value} and cannot be cancelled now")
        return current

    async def wait_terminal(self, task_id: int, timeout: float | None = None) -> Task:
        """Wait until the task has ended (its terminal event is committed); return it.

        Raises ``TaskNotFound``, or ``TimeoutError`` after ``timeout`` seconds.
        """
        if self._n_waiters >= MAX_WAITERS:
            raise ServerBusy("too many callers are waiting for tasks", retry_after=1.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(future)
        self._n_waiters += 1
        try:
            task = await self.get(task_id)  # after registering, so no ending is missed
            if task.state in TERMINAL:
                return task
            async with asyncio.timeout(timeout):
                await future
            return await self.get(task_id)
        finally:
            self._n_waiters -= 1
            futures = self._waiters.get(task_id)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._waiters[task_id]

    def stats(self) -> dict[str, Any]:
        """Counters in the spirit of Swoole's ``stats()``; cheap, from memory."""
        busy = self._pool.busy if self._pool else 0
        total = self.settings.task_workers
        counts = {state.value: n for state, n in self._counts.items()}
        return {
            "workers": {"total": total, "busy": busy, "idle": total - busy},
            "tasks": counts,
            "queued": counts["queued"],
            "running": counts["running"],
            "succeeded": counts["succeeded"],
            "failed": counts["failed"],
            "cancelled": counts["cancelled"],
            "ready": len(self._ready),
            "backlog_on_disk": self._ready.has_backlog,
            "subscribers": len(self.hub),
            "commits": self._store.commits if self._store else 0,
            "last_event_id": self._store.last_event_id if self._store else 0,
        }

    # --- events --------------------------------------------------------------------

    def subscribe(self, task_id: int | None = None) -> Subscription[Event]:
        """A subscription to one task's events, or to all tasks'. Close it when done."""
        if task_id is None:
            return self.hub.subscribe(match_all=True)
        return self.hub.subscribe((self.topic(task_id),))

    async def events_after(
        self,
        after_id: int,
        *,
        task_id: int | None = None,
        tasks_only: bool = True,
        limit: int = 1000,
    ) -> list[Event]:
        """Stored events with ids above ``after_id``, oldest first (replay).

        By default only task events; ``tasks_only=False`` adds published updates.
        """
        return await self.store.events_after(
            after_id, limit=limit, task_id=task_id, tasks_only=tasks_only
        )

    # --- wiring (called by the store and the pool) ------------------------------------

    def _committed(self, committed: Committed) -> None:
        # Runs in the writer after every commit: feed the window, then push events.
        offer = self._ready.offer
        for task in committed.inserted:
            offer(task)
        for _ in committed.cancelled:
            self._counts[TaskState.QUEUED] -= 1
            self._counts[TaskState.CANCELLED] += 1
        publish = self.hub.publish
        prefix = self._topic_prefix
        waiters = self._waiters
        for event in committed.events:
            if event.task_id is None:
                publish(event.topics, event)
                continue
            publish((f"{prefix}{event.task_id}",), event)
            if waiters and event.type in TERMINAL_EVENTS:
                for future in waiters.get(event.task_id, ()):
                    if not future.done():
                        future.set_result(None)

    def _page_in(self, after_id: int, limit: int) -> None:
        self.store.page_queued(after_id, limit, self._ready.deliver)

    def _is_running(self, task_id: int) -> bool:
        return self._pool is not None and self._pool.is_running(task_id)

    def _report(self, task: Task, type_: EventType, extra: dict[str, Any] | None) -> None:
        store = self.store
        store.update_task(task, type_, extra)  # NotSerializable propagates to the pool
        counts = self._counts
        if type_ is EventType.STARTED:
            counts[TaskState.QUEUED] -= 1
            counts[TaskState.RUNNING] += 1
        elif type_ is EventType.RETRYING:
            # No backoff yet: the task goes straight back to the queue.
            task.state = TaskState.QUEUED
            task.started_at = None
            requeued = store.update_task(task, EventType.QUEUED, {"retry": True})
            requeued.add_done_callback(partial(self._offer_when_stored, task))
            counts[TaskState.RUNNING] -= 1
            counts[TaskState.QUEUED] += 1
        else:
            counts[TaskState.RUNNING] -= 1
            counts[task.state] += 1

    def _offer_when_stored(self, task: Task, stored: asyncio.Future[None]) -> None:
        if not stored.cancelled() and stored.exception() is None:
            self._ready.offer(task)

    def _record_progress(self, task: Task, fraction: float, message: str | None) -> Any:
        task.progress, task.message = fraction, message
        extra: dict[str, Any] = {"progress": fraction, "message": message}
        return asyncio.shield(self.store.update_task(task, EventType.PROGRESS, extra))
