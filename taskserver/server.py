"""``TaskServer``: wires the store, the ready queue, the worker pool and the hub.

Data flows one way::

    task() ─▶ Store (group commit) ─on_commit─▶ ReadyQueue ─▶ WorkerPool ─report─▶ Store
                                    └─────────▶ Fanout ─▶ SSE subscribers

The public surface: ``on()`` / ``queue()`` / ``defaults()`` / ``schedule()`` at
setup; ``task()``, ``submit()``, ``task_many()`` to enqueue; ``get()``,
``list_tasks()``, ``cancel()``, ``retry()``, ``purge()``, ``wait()``,
``task_wait()``, ``stats()`` to look and act; ``start()`` / ``stop()`` for the
lifecycle (``app.py`` runs them in one ``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, TypeVar, overload

from . import lifecycle
from .config import Settings
from .errors import (
    ConfigError,
    Conflict,
    ServerBusy,
    ServerClosed,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    ValidationError,
)
from .lifecycle import ACTIVE_ORDER, RETRYABLE, TERMINAL, TERMINAL_ORDER
from .models import TERMINAL_EVENTS, Event, EventType, RetryPolicy, Task, TaskState
from .push.fanout import Fanout, Subscription
from .runtime.options import Defaults, TaskSpec, encode_payload, prepare
from .runtime.periodic import Schedule, run_schedules
from .runtime.ready import ReadyQueue
from .runtime.tuning import RuntimeTuning
from .runtime.workers import Callback, Limits, WorkerPool
from .storage import Durable, NewTask, Store

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[[Any, str], object])
CallbackName = Literal["task", "finish", "before", "after", "error"]
CALLBACKS = ("task", "finish", "before", "after", "error")

#: Waiters for task outcomes (``wait``, ``cancel``) held at once; past it, ServerBusy.
MAX_WAITERS = 100_000
#: Ended tasks deleted per writer round when purging.
PURGE_CHUNK = 5_000
#: Due tasks promoted per writer round.
DUE_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class Submitted:
    """What ``submit`` did: the task id, and whether a unique key matched an existing task."""

    id: int
    existing: bool = False
    #: the state it was stored in: ``queued``, or ``waiting`` for a delayed task
    #: (``None`` for an existing task: ask ``get()``)
    state: TaskState | None = None
    #: the topic its events are published on (the Mercure hub, ``/events``)
    topic: str = ""


class TaskServer:
    """A task server: register callbacks with ``on()``, then ``start()``.

    ``clock`` returns seconds since the epoch; tests inject their own and call
    ``poke()`` after moving it, so delays and backoff test without sleeping.
    """

    def __init__(
        self, settings: Settings | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings or Settings()
        self._clock = clock
        self._callbacks: dict[str, Callback] = {}
        self.fanout: Fanout[Event] = Fanout(
            max_subscribers=self.settings.max_subscribers,
            buffer_size=self.settings.subscriber_queue,
        )
        self._store: Store | None = None
        self._pool: WorkerPool | None = None
        self._ready = ReadyQueue(
            self.settings.ready_window, self._page_in, self._group_head, self.is_running
        )
        self._counts: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._n_waiters = 0
        self._closing = False
        self._started = False
        self._topic_prefix = f"{self.settings.public_url}/tasks/"
        self._retry = RetryPolicy(
            base=self.settings.retry_base,
            factor=self.settings.retry_factor,
            cap=self.settings.retry_cap,
            jitter=self.settings.retry_jitter,
        )
        self._queue_defaults: dict[str, Defaults] = {}
        self._name_defaults: dict[str, Defaults] = {}
        self._schedules: dict[str, Schedule] = {}
        self._unique: dict[str, int] = {}
        self._unique_by_id: dict[int, str] = {}
        #: the commit of each task with a unique key until it is durable: a caller given
        #: such a task as ``existing`` awaits it, so the id it gets can be read
        self._unique_commits: dict[int, asyncio.Future[None]] = {}
        self._due_wake = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self._unique_lock = asyncio.Lock()
        #: a task with no options, resolved once (``_prepare``'s fast path)
        self._plain: NewTask | None = None
        self._tuning = RuntimeTuning(self.settings.gil_switch_interval, self.settings.gc_threshold)
        #: ``fn(request, scope)`` deciding who may use the HTTP routes (``authorize``).
        self.authorizer: Callable[[Any, str], object] | None = None

    def __repr__(self) -> str:
        state = "closing" if self._closing else ("running" if self._started else "idle")
        return (
            f"<TaskServer {state} workers={self.settings.task_workers} "
            f"queued={self._counts[lifecycle.QUEUED]} ready={len(self._ready)}>"
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
        """Register a callback, as Swoole's ``$server->on()``; a second one replaces the first.

        ``task(ctx)`` returns the result (JSON-encodable); ``finish(ctx, result)``
        then runs in this process. Hooks: ``before(ctx)``, ``after(ctx, result)``,
        ``error(ctx, exc)`` run around every task; a failing hook is recorded in
        the task's ``hook_error``. ``async def`` runs on the loop, a plain function
        in a thread, a plain ``task`` function with ``cpu_bound=True`` in a process.
        Use as ``server.on("task", handler)`` or as a decorator.
        """
        if event not in CALLBACKS:
            raise ConfigError(f"unknown callback {event!r}: use one of {', '.join(CALLBACKS)}")
        if cpu_bound and event != "task":
            raise ConfigError(f"cpu_bound applies to the 'task' callback only, not {event!r}")
        if self._started:
            raise ConfigError("callbacks must be registered before the server starts")

        def register(callback: F) -> F:
            try:
                self._callbacks[event] = Callback.of(callback, cpu_bound=cpu_bound)
            except TypeError as exc:
                raise ConfigError(f"{event} callback: {exc}") from None
            return callback

        return register if fn is None else register(fn)

    def queue(
        self,
        name: str,
        *,
        priority: int = 0,
        concurrency: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Declare a named queue: its priority (higher runs first), concurrency limit and
        defaults for its tasks. Tasks may use undeclared queues (priority 0, no limit).
        """
        if concurrency is not None and concurrency < 1:
            raise ConfigError(f"queue {name!r}: concurrency must be at least 1")
        self._ready.configure(name, priority=priority, concurrency=concurrency)
        self._plain = None
        self._queue_defaults[name] = Defaults(
            max_attempts=max_attempts, timeout=timeout, retry=retry
        )

    def defaults(
        self,
        name: str,
        *,
        queue: str | None = None,
        priority: int | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Defaults for tasks enqueued with ``name=name``; call options override them."""
        self._plain = None
        self._name_defaults[name] = Defaults(
            queue=queue, priority=priority, max_attempts=max_attempts, timeout=timeout, retry=retry
        )

    def schedule(
        self, name: str, cron: str, data: Any = None, *, tz: str = "UTC", **options: Any
    ) -> None:
        """Enqueue ``data`` (with ``options``, as for ``task``) at every due time of ``cron``.

        Each due time is enqueued once, across restarts; runs missed while the
        server was down are enqueued when it starts.
        """
        schedule = Schedule(name, cron, data, dict(options), tz)
        schedule.check()
        try:  # bad options would otherwise fail every run, later, in a log line
            self._resolve(TaskSpec(data, {"name": name, **options}), "")
        except ValidationError as exc:
            raise ConfigError(f"schedule {name!r}: {exc}") from None
        self._schedules[name] = schedule

    def authorize(self, fn: A) -> A:
        """Let ``fn(request, scope) -> bool`` (sync or async) decide who may use the HTTP API.

        ``scope`` is ``read``, ``enqueue`` or ``admin``; true allows, false answers 403,
        and what ``fn`` raises (an ``AccessDenied``, an aiohttp redirect) is the answer.
        Requests with a valid API token of ours do not reach it. Usable as a decorator.
        """
        self.authorizer = fn
        return fn

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
        """Open the store (recovering dead work), start the workers and the schedulers."""
        self.check()
        if self._started:
            raise RuntimeError("TaskServer.start() called twice")
        self._store = Store(
            self.settings.db,
            synchronous=self.settings.synchronous,
            max_pending_writes=self.settings.max_pending_writes,
            on_commit=self._committed,
            on_ready=self._feed,
            on_failed=self._not_stored,
            clock=self._clock,
        )
        opened = await self._store.open()
        self._tuning.apply()
        self._counts = opened.counts
        self._unique = opened.unique_keys
        self._unique_by_id = {task_id: key for key, task_id in self._unique.items()}
        for group, head, state in opened.group_heads:
            self._ready.restore_group(group, head, state)
        if self.settings.task_workers > 0:
            s = self.settings
            self._pool = WorkerPool(
                s.task_workers,
                get=self._ready.get,
                done=self._ready.done,
                report=self._report,
                progress=self._record_progress,
                callbacks=self._callbacks,
                retry=self._retry,
                limits=Limits(s.process_workers, s.process_max_tasks, s.process_max_memory_mb),
                clock=self._clock,
            )
            self._pool.start()
        self._started = True
        self._closing = False
        self._ready.start_from_disk(opened.queues_with_work)
        self._background = [
            asyncio.create_task(self._due_loop(), name="taskserver-due"),
            asyncio.create_task(self._maintenance_loop(), name="taskserver-maintenance"),
        ]
        if self._schedules:
            self._background.append(
                asyncio.create_task(self._schedule_loop(), name="taskserver-periodic")
            )
        log.info(
            "taskserver started: %d workers, %d queued, db %s",
            self.settings.task_workers,
            self._counts[lifecycle.QUEUED],
            self.settings.db,
        )

    def close_streams(self) -> None:
        """End every open event stream (first step of a shutdown)."""
        self.fanout.close()

    async def stop(self) -> None:
        """Stop: refuse new tasks, give running ones the grace period, re-queue the rest.

        Whatever is queued, waiting or retrying stays on disk for the next start.
        """
        if not self._started:
            return
        self._closing = True
        self.fanout.close()
        for job in self._background:
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._pool is not None:
            interrupted = await self._pool.stop(self.settings.grace_period)
            for task in interrupted:
                # Not the task's fault: hand the attempt back.
                lifecycle.interrupt(task)
                self.store.update_task(task, EventType.QUEUED, {"interrupted": True})
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
        await self.store.close()
        self._tuning.undo()
        self._started = False

    @property
    def store(self) -> Store:
        """The store; ``ServerClosed`` when the server is not running."""
        if self._store is None:
            raise ServerClosed("the task server is not running")
        return self._store

    def poke(self) -> None:
        """Re-check due times now (after an injected clock moved)."""
        self._due_wake.set()

    # --- enqueue ---------------------------------------------------------------

    def _admit(self, count: int) -> Store:
        if self._closing or not self._started:
            raise ServerClosed("the server is not accepting tasks (stopping or not started)")
        limit = self.settings.max_queued
        if count > limit:
            # Waiting cannot help: not even an empty queue takes it (a 503 would be retried).
            raise ValidationError(
                f"{count} new tasks in one batch can never fit: max_queued is {limit}",
                field="tasks",
            )
        active = sum(self._counts[state] for state in lifecycle.BACKLOG)
        if active + count > limit:
            raise ServerBusy(
                f"{active} tasks are waiting to run, the limit is {self.settings.max_queued}",
                retry_after=5.0,
            )
        return self.store

    def _prepare(self, spec: TaskSpec, where: str = "") -> NewTask:
        if not spec.options:
            # The common case: no options. The defaults are resolved once; only the data
            # is encoded.
            text, value = encode_payload(spec.data, f"{where}data")
            p = self._plain_options()
            return NewTask(
                text,
                value,
                p.max_attempts,
                p.timeout,
                p.queue,
                p.priority,
                None,
                None,
                None,
                None,
                p.retry,
                None,
            )
        return self._resolve(spec, where)

    def _plain_options(self) -> NewTask:
        """The options of a task given none, resolved once (``text``/``data`` unused)."""
        if self._plain is None:
            self._plain = self._resolve(TaskSpec(None), "")
        return self._plain

    def _resolve(self, spec: TaskSpec, where: str) -> NewTask:
        # Only a str can name defaults: a list (bad input, refused by prepare) is unhashable.
        name = spec.options.get("name")
        name_defaults = self._name_defaults.get(name) if isinstance(name, str) else None
        queue = spec.options.get("queue") or (name_defaults.queue if name_defaults else None)
        return prepare(
            spec,
            where=where,
            now=self._clock(),
            settings=self.settings,
            by_name=name_defaults,
            by_queue=self._queue_defaults.get(queue if isinstance(queue, str) else "default"),
        )

    async def submit(self, data: Any, **options: Any) -> Submitted:
        """Enqueue one task; like ``task`` but says whether a unique key matched.

        Options: ``name``, ``queue``, ``priority``, ``delay`` (s) or ``available_at``
        (epoch s), ``serial_group``, ``unique_key``, ``unique_for`` (s: a task with
        the key that succeeded that recently also counts), ``timeout`` (s),
        ``max_attempts``, ``retry`` (a ``RetryPolicy``). Raises
        ``ValidationError``/``NotSerializable`` naming the field (nothing written),
        ``ServerBusy`` when full, ``ServerClosed`` while stopping.
        """
        if "unique_key" in options or "serial_group" in options:
            return (await self._insert([TaskSpec(data, options)]))[0]
        task, committed = self._append_one(data, options)
        await committed
        return Submitted(task.id, state=task.state, topic=self.topic(task.id))

    async def task(self, data: Any, **options: Any) -> int:
        """Enqueue one task and return its id once it is durable. Options as ``submit``."""
        if "unique_key" in options or "serial_group" in options:
            return (await self.submit(data, **options)).id
        task, committed = self._append_one(data, options)
        await committed
        return task.id

    def _append_one(self, data: Any, options: dict[str, Any]) -> tuple[Task, asyncio.Future[None]]:
        # The hot path: one task, no uniqueness or group to look after. Everything is
        # validated before anything is appended.
        if options:
            item = self._resolve(TaskSpec(data, options), "")
            text, data = item.text, item.data
        else:
            item = self._plain_options()
            text, data = encode_payload(data)
        task, committed = self._admit(1).insert_task(item, text, data)
        self._counts[task.state] += 1
        return task, committed

    async def task_many(self, items: Iterable[Any], **options: Any) -> list[Submitted]:
        """Enqueue many tasks in one transaction: all or none.

        Each item is a ``TaskSpec`` (its options override ``options``) or plain data.
        A bad item raises ``ValidationError`` naming it (``tasks[3].timeout``) and
        nothing is written; so does a batch with more new tasks than ``max_queued``
        (it could never fit). ``ServerBusy`` means it would fit in an emptier queue.
        """
        specs = [
            item.with_defaults(options)
            if isinstance(item, TaskSpec)
            else TaskSpec(item, dict(options))
            for item in items
        ]
        if not specs:
            raise ValidationError("no tasks given", field="tasks")
        return await self._insert(specs, batch=True)

    async def _insert(
        self,
        specs: Sequence[TaskSpec],
        *,
        batch: bool = False,
        schedule: tuple[str, float] | None = None,
    ) -> list[Submitted]:
        prepared = [
            self._prepare(spec, f"tasks[{i}]." if batch else "") for i, spec in enumerate(specs)
        ]
        if any(item.unique_for for item in prepared):
            # Looking up recent tasks awaits the disk: two callers with the same key
            # must not both miss, so such look-ups and their appends take turns.
            async with self._unique_lock:
                results, commits = await self._append(prepared, schedule)
        else:
            results, commits = await self._append(prepared, schedule)
        for committed in commits:
            await committed
        return results

    async def _append(
        self, prepared: list[NewTask], schedule: tuple[str, float] | None
    ) -> tuple[list[Submitted], list[asyncio.Future[None]]]:
        """Resolve unique keys and append the new tasks; returns the answers and the
        commits to await: the new tasks' and those of existing tasks not yet durable."""
        results: list[Submitted | None] = [None] * len(prepared)
        commits: list[asyncio.Future[None]] = []
        fresh: list[NewTask] = []
        positions: list[int] = []  # where each fresh task's answer goes
        repeats: list[tuple[int, int]] = []  # (position, index in fresh): same key twice
        first_with_key: dict[str, int] = {}
        # Every disk read first; then the keys are resolved with no await in between,
        # so nobody can take a key after we looked.
        recent: dict[str, int | None] = {}
        for item in prepared:
            if item.unique_key is not None and item.unique_for:
                since = self._clock() - item.unique_for
                recent[item.unique_key] = await self.store.recent_unique(item.unique_key, since)
        for i, item in enumerate(prepared):
            key = item.unique_key
            if key is not None:
                existing = self._unique.get(key)
                if existing is None and item.unique_for:
                    existing = recent.get(key)
                if existing is not None:
                    results[i] = Submitted(existing, existing=True, topic=self.topic(existing))
                    pending = self._unique_commits.get(existing)
                    if pending is not None and pending not in commits:
                        commits.append(pending)
                    continue
                if key in first_with_key:
                    repeats.append((i, first_with_key[key]))
                    continue
                first_with_key[key] = len(fresh)
            positions.append(i)
            fresh.append(item)
        if fresh:
            tasks, committed = self._admit(len(fresh)).insert_tasks(fresh, schedule=schedule)
            commits.append(committed)
            keyed: list[int] = []
            for task in tasks:
                self._counts[task.state] += 1
                if task.serial_group is not None:
                    self._ready.claim(task)
                if task.unique_key is not None:
                    self._unique[task.unique_key] = task.id
                    self._unique_by_id[task.id] = task.unique_key
                    self._unique_commits[task.id] = committed
                    keyed.append(task.id)
            if keyed:
                committed.add_done_callback(lambda _: self._durable(keyed))
            for position, task in zip(positions, tasks, strict=True):
                results[position] = Submitted(task.id, state=task.state, topic=self.topic(task.id))
            for position, index in repeats:
                results[position] = Submitted(
                    tasks[index].id, existing=True, topic=self.topic(tasks[index].id)
                )
        return [r for r in results if r is not None], commits

    def _durable(self, task_ids: list[int]) -> None:
        # Their batch is done (committed or failed): answers need not wait for it any more.
        for task_id in task_ids:
            self._unique_commits.pop(task_id, None)

    def topic(self, task_id: int) -> str:
        """The topic (an IRI) on which a task's events are published."""
        return f"{self._topic_prefix}{task_id}"

    def set_public_url(self, url: str) -> None:
        """Set the URL task topics are built on (the CLI calls it once the port is known)."""
        if not self.settings.base_url:
            self._topic_prefix = f"{url.rstrip('/')}/tasks/"

    # --- look and act ------------------------------------------------------------

    async def get(self, task_id: int) -> Task:
        """The task's committed state; ``TaskNotFound`` when there is none."""
        task = await self.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def list_tasks(
        self,
        *,
        state: TaskState | None = None,
        after: int = 0,
        limit: int = 100,
        before: int | None = None,
    ) -> list[Task]:
        """One page of tasks: ids above ``after`` in id order, or below ``before`` newest first."""
        return await self.store.list_tasks(state=state, after=after, limit=limit, before=before)

    async def cancel(self, task_id: int) -> Task:
        """Cancel a task that has not ended and return it, cancelled.

        Raises ``TaskNotFound``, or ``Conflict`` when it has already ended.
        """
        store = self.store
        if self._pool is not None and self._pool.cancel(task_id):
            return await self.wait_terminal(task_id, timeout=self.settings.grace_period + 5)
        # Tombstoned before any await: no page may take it in while we decide.
        self._ready.tombstone(task_id)
        try:
            task = self._ready.remove(task_id)
            if task is not None:  # waiting in memory: ours to write
                lifecycle.end(task, lifecycle.CANCELLED, self._clock())
                self._counts[lifecycle.QUEUED] -= 1  # the ready queue holds queued tasks only
                self._counts[lifecycle.CANCELLED] += 1
                await store.update_task(task, EventType.CANCELLED)
                return task
            previous = await store.cancel_pending(task_id)
        finally:
            self._ready.untombstone(task_id)
        if previous is not None:
            self._counts[previous] -= 1
            self._counts[lifecycle.CANCELLED] += 1
            return await self.get(task_id)
        current = await self.get(task_id)
        if current.state in TERMINAL:
            raise Conflict(f"task {task_id} has already ended ({current.state.value})")
        raise Conflict(f"task {task_id} is {current.state.value} and cannot be cancelled now")

    async def retry(self, task_id: int) -> Task:
        """Re-queue a failed or cancelled task, attempts reset; ``Conflict`` otherwise."""
        before = await self.get(task_id)
        if before.state not in RETRYABLE:
            raise Conflict(
                f"task {task_id} is {before.state.value}; only failed or cancelled "
                "tasks can be retried"
            )
        if before.unique_key is not None and before.unique_key in self._unique:
            raise Conflict(
                f"task {self._unique[before.unique_key]} with the same unique_key is still active"
            )
        # Tombstoned until we offer it ourselves: a page must not take it in first.
        self._ready.tombstone(task_id)
        try:
            previous = await self.store.retry_ended(task_id)
            if previous is None:
                raise Conflict(f"task {task_id} changed state meanwhile; try again")
            self._counts[previous] -= 1
            self._counts[lifecycle.QUEUED] += 1
            task = await self.get(task_id)
        finally:
            self._ready.untombstone(task_id)
        if task.unique_key is not None:
            self._unique[task.unique_key] = task.id
            self._unique_by_id[task.id] = task.unique_key
        if task.state is lifecycle.QUEUED:
            self._ready.offer(task)
        return task

    async def retry_failed(self, limit: int = 10_000) -> list[int]:
        """Re-queue up to ``limit`` failed tasks; returns the ids re-queued."""
        done: list[int] = []
        for task_id in await self.store.ids_in_state(lifecycle.FAILED, limit):
            with contextlib.suppress(Conflict, TaskNotFound):
                await self.retry(task_id)
                done.append(task_id)
        return done

    async def purge(
        self,
        older_than: float,
        states: Iterable[TaskState] = TERMINAL_ORDER,
    ) -> int:
        """Delete ended tasks (and their events) that finished over ``older_than`` s ago."""
        cutoff = self._clock() - older_than
        total = 0
        for state in dict.fromkeys(states):
            # One state at a time, so the in-memory counters stay exact: ended tasks
            # change state only through the writer, which runs these in order.
            while True:
                deleted = await self.store.purge((state,), cutoff, chunk=PURGE_CHUNK)
                self._counts[state] -= deleted
                total += deleted
                if deleted < PURGE_CHUNK:
                    break
        return total

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

    async def wait(self, ids: Sequence[int], timeout: float | None = None) -> list[Any]:
        """Results of ``ids``, in order, once all succeeded (Swoole's ``taskWaitMulti``).

        Raises ``TaskFailed`` / ``TaskCancelled`` for the first that ended badly,
        ``TimeoutError`` when not all ended within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            tasks = await asyncio.gather(*(self.wait_terminal(i) for i in ids))
        return [_result_of(task) for task in tasks]

    async def task_wait(self, data: Any, timeout: float | None = None, **options: Any) -> Any:
        """Enqueue a task and wait for its result (Swoole's ``taskwait``).

        Raises ``TaskFailed``, ``TaskCancelled``, or ``TimeoutError`` (the task
        keeps running; its id is in the exception's notes).
        """
        task_id = await self.task(data, **options)
        try:
            task = await self.wait_terminal(task_id, timeout)
        except TimeoutError as exc:
            exc.add_note(f"task {task_id} is still running")
            raise
        return _result_of(task)

    def stats(self) -> dict[str, Any]:
        """Counters in the spirit of Swoole's ``stats()``; cheap, from memory."""
        busy = self._pool.busy if self._pool else 0
        total = self.settings.task_workers
        counts = {state.value: n for state, n in self._counts.items()}
        processes = self._pool.processes if self._pool else None
        return {
            "workers": {"total": total, "busy": busy, "idle": total - busy},
            "tasks": counts,
            **{k: counts[k] for k in ("queued", "running", "succeeded", "failed", "cancelled")},
            "ready": len(self._ready),
            "backlog_on_disk": self._ready.has_backlog,
            "queues": self._ready.snapshot(),
            "processes": {"recycled": processes.recycled, "crashed": processes.crashed}
            if processes
            else None,
            "subscribers": len(self.fanout),
            "commits": self._store.commits if self._store else 0,
            "failed_commits": self._store.failed_commits if self._store else 0,
            "last_event_id": self._store.committed_event_id if self._store else 0,
        }

    async def queue_stats(self) -> dict[str, dict[str, Any]]:
        """Per queue: tasks that have not ended, by state (from the store; zeros included),
        and the queue's priority, concurrency limit and what it holds in memory."""
        counts = await self.store.count_by_queue()
        memory = self._ready.snapshot()
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(set(counts) | set(memory)):
            by_state = counts.get(name, {})
            row: dict[str, Any] = {state.value: by_state.get(state, 0) for state in ACTIVE_ORDER}
            held = memory.get(name)
            if held is not None:
                row["running"] = held["running"]  # live, where the store lags a commit
                row.update({k: v for k, v in held.items() if k != "running"})
            out[name] = row
        return out

    # --- events --------------------------------------------------------------------

    def subscribe(self, task_id: int | None = None) -> Subscription[Event]:
        """A subscription to one task's events, or to all. Close it when done."""
        if task_id is None:
            return self.fanout.subscribe(match_all=True)
        return self.fanout.subscribe((self.topic(task_id),))

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

    @property
    def last_event_id(self) -> int:
        """The highest event id handed out (committed or about to be): a replay cursor bound."""
        return self.store.last_event_id

    @property
    def committed_event_id(self) -> int:
        """The highest event id committed: a stream starting now replays nothing below it."""
        return self.store.committed_event_id

    async def find_event(self, uid: str) -> int | None:
        """The sequence number of the first stored event with publisher id ``uid``, or ``None``."""
        return await self.store.find_event(uid)

    def publish_update(
        self,
        topics: tuple[str, ...],
        data: str,
        *,
        private: bool = False,
        uid: str | None = None,
        type_: str | None = None,
        retry: int | None = None,
    ) -> tuple[Event, asyncio.Future[None]]:
        """Store an update published to the Mercure hub in the event sequence; pushed at commit.

        Returns the event and its commit. ``ServerBusy`` when the writer is full.
        """
        return self.store.publish_update(
            topics, data, private=private, uid=uid, type_=type_, retry=retry
        )

    def cannot_write(self) -> str | None:
        """Why writes cannot be expected to commit now (``/readyz``), or ``None``."""
        return self.store.cannot_write()

    def probe_write(self) -> asyncio.Future[int]:
        """A real write in the next batch: resolves once it committed (``/readyz``)."""
        return self.store.probe_write()

    # --- wiring (called by the store and the pool) ------------------------------------

    def _committed(self, committed: Durable) -> None:
        # Runs in the writer after every commit: bookkeeping, then push the events.
        if committed.delayed:
            self._due_wake.set()
        publish = (
            self.fanout.publish if len(self.fanout) else None
        )  # nobody listens: skip the topics
        prefix = self._topic_prefix
        for event in committed.events:
            if event.task_id is None:
                if publish is not None:
                    publish(event.topics, event)
                continue
            if publish is not None:
                publish((f"{prefix}{event.task_id}",), event)
            if event.type in TERMINAL_EVENTS:
                self._ended(event.task_id)

    def _feed(self, tasks: list[Task]) -> None:
        # Runs in the writer after the callers of a batch resumed: wake the workers.
        offer = self._ready.offer
        for task in tasks:
            offer(task)

    def _not_stored(self, tasks: list[Task]) -> None:
        # A batch with these new tasks failed to commit: forget what _append counted.
        for task in tasks:
            self._counts[task.state] -= 1
            self._ended(task.id)

    def _ended(self, task_id: int) -> None:
        self._ready.release(task_id)
        key = self._unique_by_id.pop(task_id, None)
        if key is not None and self._unique.get(key) == task_id:
            del self._unique[key]
        for future in self._waiters.get(task_id, ()):
            if not future.done():
                future.set_result(None)

    def _page_in(self, queue: str, limit: int, busy_groups: list[str]) -> None:
        self.store.page_queued(
            queue, limit, busy_groups, lambda tasks: self._ready.deliver(queue, tasks)
        )

    def _group_head(self, group: str) -> None:
        self.store.group_head(
            group, lambda tasks: self._ready.deliver_head(group, tasks[0] if tasks else None)
        )

    def is_running(self, task_id: int) -> bool:
        """True while a worker runs the task (its ``running`` row may not be committed yet)."""
        return self._pool is not None and self._pool.is_running(task_id)

    def _report(self, task: Task, type_: EventType, extra: dict[str, Any] | None) -> None:
        self.store.update_task(task, type_, extra)  # NotSerializable propagates to the pool
        counts = self._counts
        if type_ is EventType.STARTED:
            counts[lifecycle.QUEUED] -= 1
            counts[lifecycle.RUNNING] += 1
        elif type_ is not EventType.PROGRESS:
            counts[lifecycle.RUNNING] -= 1
            counts[task.state] += 1

    def _record_progress(self, task: Task, fraction: float, message: str | None) -> Any:
        message = message or None  # an empty message is none (the store relies on it)
        task.progress, task.message = fraction, message
        extra: dict[str, Any] = {"progress": fraction, "message": message}
        return self.store.update_task(task, EventType.PROGRESS, extra)

    # --- background loops ---------------------------------------------------------------

    async def _due_loop(self) -> None:
        """Move waiting and retrying tasks to ``queued`` when due; sleep until the next."""
        loop = asyncio.get_running_loop()
        while True:
            self._due_wake.clear()  # before the query: a commit after it wakes us again
            try:
                next_due = await self.store.next_due()
                now = self._clock()
                if next_due is not None and next_due <= now:
                    promoted: asyncio.Future[asyncio.Future[None] | None] = loop.create_future()
                    self.store.due_tasks(now, DUE_PAGE, partial(self._promote, promoted))
                    stored = await promoted
                    if stored is not None:
                        await stored  # or the next query sees them again
                    continue
            except ServerBusy:
                pass  # the store is closing
            except Exception:
                log.exception("scheduling due tasks failed; retrying in a second")
                next_due = self._clock() + 1
            delay = None if next_due is None else max(0.0, next_due - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._due_wake.wait()

    def _promote(
        self, promoted: asyncio.Future[asyncio.Future[None] | None], tasks: list[Task]
    ) -> None:
        # Called by the writer between batches with due tasks as stored.
        stored = None
        for task in tasks:
            previous = lifecycle.make_due(task)
            stored = self.store.update_task(task, EventType.QUEUED, {"due": True}, ready=True)
            self._counts[previous] -= 1
            self._counts[lifecycle.QUEUED] += 1
        if not promoted.done():  # the due loop may have been cancelled (stop)
            promoted.set_result(stored)

    async def _maintenance_loop(self) -> None:
        """Apply retention: purge old ended tasks and trim the event history."""
        s = self.settings
        while True:
            await asyncio.sleep(s.maintenance_interval)
            try:
                if s.retention > 0:
                    purged = await self.purge(s.retention)
                    if purged:
                        log.info("retention: purged %d ended tasks", purged)
                before = self._clock() - s.event_retention if s.event_retention > 0 else None
                keep = s.max_events or None
                if before is not None or keep is not None:
                    while await self.store.trim_events(before=before, keep=keep):
                        pass
            except (ServerBusy, ServerClosed):
                return
            except Exception:
                log.exception("retention maintenance failed")

    async def _schedule_loop(self) -> None:
        """Periodic schedules: see ``periodic.run_schedules``."""
        last_due = await self.store.schedules()
        await run_schedules(self._schedules, last_due, self._enqueue_run, self._clock)

    async def _enqueue_run(self, schedule: Schedule, due: float) -> None:
        options = {"name": schedule.name, **schedule.options}
        await self._insert([TaskSpec(schedule.data, options)], schedule=(schedule.name, due))


def _result_of(task: Task) -> Any:
    if task.state is lifecycle.SUCCEEDED:
        return task.result
    if task.state is lifecycle.CANCELLED:
        raise TaskCancelled(task.id)
    raise TaskFailed(task.id, task.error)
