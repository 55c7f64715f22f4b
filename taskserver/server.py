"""``TaskServer``: a thin facade over named parts.

Data flows one way::

    task() ─▶ Enqueue ─▶ Store (group commit) ─committed─▶ Outcomes ─▶ Fanout ─▶ subscribers
                                               └─feed──▶ ReadyQueue ─▶ WorkerPool ─report─▶ Outcomes

The parts (``runtime/``): ``Enqueue`` (options, unique keys, new tasks),
``Outcomes`` (what commits and workers report: counts, events, ready tasks),
``Control`` (get, cancel, retry, purge, waiting for an end), ``Maintenance``
(due tasks, retention, schedules); they share ``Shared``. The store's and the
pool's callbacks are wired to those parts.

The public surface: ``on()`` / ``queue()`` / ``defaults()`` / ``schedule()`` at
setup; ``task()``, ``submit()``, ``task_many()`` to enqueue; ``get()``,
``list_tasks()``, ``cancel()``, ``retry()``, ``purge()``, ``wait()``,
``task_wait()``, ``stats()`` to look and act; ``start()`` / ``stop()`` for the
lifecycle (``web/app.py`` runs them in one ``cleanup_ctx``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

from . import lifecycle
from .config import Settings
from .errors import ConfigError, TaskCancelled, TaskFailed, ValidationError
from .lifecycle import ACTIVE_ORDER, TERMINAL_ORDER
from .models import Event, EventType, RetryPolicy, Task, TaskState
from .push.fanout import Fanout, Subscription
from .runtime.bulk import Action, Bulk, BulkResult, Where
from .runtime.control import Control
from .runtime.counts import SharedQueueCounts
from .runtime.enqueue import Enqueue, Submitted
from .runtime.maintenance import Maintenance
from .runtime.options import Defaults, TaskSpec
from .runtime.outcomes import Outcomes
from .runtime.periodic import Schedule
from .runtime.ready import ReadyQueue
from .runtime.shared import Shared
from .runtime.tally import Tally
from .runtime.tuning import RuntimeTuning
from .runtime.waiting import Waiters
from .runtime.workers import Callback, Limits, WorkerPool
from .storage import Signals, Store, is_postgres, redact
from .storage.postgres.subscribers import SharedSubscribers

__all__ = ["Submitted", "TaskServer"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound=Callable[[Any, str], object])
CallbackName = Literal["task", "finish", "before", "after", "error"]
CALLBACKS = ("task", "finish", "before", "after", "error")


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
        self._shared = shared = Shared(self.settings, clock, Waiters())
        shared.topic_prefix = f"{self.settings.public_url}/tasks/"
        self._outcomes = Outcomes(shared, self.fanout)
        # On a database shared by several servers a task is ours once claimed; a server
        # claims for its idle workers, and ``prefetch`` more while tasks are short.
        claiming = is_postgres(self.settings.db)
        shared.ready = ReadyQueue(
            self.settings.task_workers if claiming else self.settings.ready_window,
            self._outcomes.page_in,
            self._outcomes.group_head,
            shared.is_running,
            claiming=claiming,
            prefetch=self.settings.prefetch,
        )
        self._enqueue = Enqueue(shared)
        self._control = Control(shared)
        self._bulk = Bulk(shared, self._control)
        self._maintenance = Maintenance(shared, self._enqueue, self._control)
        self._background: list[asyncio.Task[None]] = []
        self._follows: set[asyncio.Task[None]] = set()
        self._retry = RetryPolicy(
            base=self.settings.retry_base,
            factor=self.settings.retry_factor,
            cap=self.settings.retry_cap,
            jitter=self.settings.retry_jitter,
        )
        self._tuning = RuntimeTuning(self.settings.gil_switch_interval, self.settings.gc_threshold)
        #: ``fn(request, scope)`` deciding who may use the HTTP routes (``authorize``).
        self.authorizer: Callable[[Any, str], object] | None = None

    def __repr__(self) -> str:
        shared = self._shared
        state = "closing" if shared.closing else ("running" if shared.started else "idle")
        return (
            f"<TaskServer {state} workers={self.settings.task_workers} "
            f"queued={shared.counts[lifecycle.QUEUED]} ready={len(shared.ready)}>"
        )

    @property
    def accepting(self) -> bool:
        """True while ``task()`` takes new tasks."""
        return self._shared.started and not self._shared.closing

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
        if self._shared.started:
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
        self._shared.ready.configure(name, priority=priority, concurrency=concurrency)
        self._enqueue.defaults_changed()
        self._enqueue.queue_defaults[name] = Defaults(
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
        self._enqueue.defaults_changed()
        self._enqueue.name_defaults[name] = Defaults(
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
            self._enqueue.resolve(TaskSpec(data, {"name": name, **options}), "")
        except ValidationError as exc:
            raise ConfigError(f"schedule {name!r}: {exc}") from None
        self._maintenance.schedules[name] = schedule

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
        shared = self._shared
        if shared.started:
            raise RuntimeError("TaskServer.start() called twice")
        outcomes = self._outcomes
        store = Store(
            self.settings.db,
            synchronous=self.settings.synchronous,
            max_pending_writes=self.settings.max_pending_writes,
            on_commit=outcomes.committed,
            on_ready=outcomes.feed,
            on_failed=outcomes.not_stored,
            signals=Signals(
                cancel=self._control.cancel_requested,
                work=self._claim_from,
                listening=lambda: bool(len(self.fanout) or len(shared.waiters)),
            ),
            node=self.node_name,
            lease=self.settings.lease,
            clock=self._clock,
        )
        shared.opened_store = store
        opened = await store.open()
        self._tuning.apply()
        if store.shared:  # the cluster's counts are in the database
            shared.counts = SharedQueueCounts(store.count_by_queue)
        shared.counts.seed(opened.counts, opened.active_by_queue)
        shared.tally.depths.clear()  # a restart in the same process counts from the disk
        if store.shared:
            shared.tally.untracked_depths()  # other servers enqueue and claim too
        else:
            shared.tally.seed(opened.queued_seconds)
        shared.unique.restore(opened.unique_keys)
        for group, head, state in opened.group_heads:
            shared.ready.restore_group(group, head, state)
        for name in opened.paused_queues:
            shared.ready.pause(name)
        if self.settings.task_workers > 0:
            s = self.settings
            shared.pool = WorkerPool(
                s.task_workers,
                get=shared.ready.get,
                done=shared.ready.done,
                report=outcomes.report,
                progress=outcomes.progress,
                callbacks=self._callbacks,
                retry=self._retry,
                limits=Limits(s.process_workers, s.process_max_tasks, s.process_max_memory_mb),
                clock=self._clock,
                tuning=self._tuning,
            )
            shared.pool.start()
        shared.started = True
        shared.closing = False
        shared.ready.start_from_disk(opened.queues_with_work)
        self._background = self._maintenance.start()
        log.info(
            "taskserver started: %d workers, %d queued, db %s",
            self.settings.task_workers,
            shared.counts[lifecycle.QUEUED],
            redact(self.settings.db) + (f" as node {self.node_name}" if store.shared else ""),
        )

    def close_streams(self) -> None:
        """End every open event stream (first step of a shutdown)."""
        self.fanout.close()

    async def stop(self) -> None:
        """Stop: refuse new tasks, give running ones the grace period, re-queue the rest.

        Whatever is queued, waiting or retrying stays on disk for the next start.
        """
        shared = self._shared
        if not shared.started:
            return
        shared.closing = True
        self.fanout.close()
        for job in self._background:
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if shared.pool is not None:
            interrupted = await shared.pool.stop(self.settings.grace_period)
            for task in interrupted:
                # Not the task's fault: hand the attempt back.
                lifecycle.interrupt(task)
                self.store.update_task(task, EventType.QUEUED, {"interrupted": True})
                shared.counts.move(task.queue, lifecycle.RUNNING, lifecycle.QUEUED)
            if interrupted:
                log.warning(
                    "re-queued %d tasks still running after the %gs grace period",
                    len(interrupted),
                    self.settings.grace_period,
                )
        if self.store.shared:
            # Claimed but not started: back to the cluster, the attempt handed back.
            for task in shared.ready.drain():
                self.store.update_task(task, EventType.QUEUED, {"interrupted": True})
        shared.waiters.close()
        await self.store.close()
        self._tuning.undo()
        shared.started = False

    def _claim_from(self, queues: list[str] | None) -> None:
        # Other servers made work in these queues (None: maybe in any we know).
        ready = self._shared.ready
        ready.start_from_disk(list(ready.snapshot()) if queues is None else queues)

    @property
    def node_name(self) -> str:
        """This server's name among those sharing a PostgreSQL database."""
        if self.settings.node_name:
            return self.settings.node_name
        host = socket.gethostname()
        port = self.settings.port
        return f"{host}:{port}" if port else f"{host}:pid{os.getpid()}"

    @property
    def opened_store(self) -> Store | None:
        """The store while the server runs, else ``None`` (``store`` raises instead)."""
        return self._shared.opened_store

    @property
    def subscribers(self) -> SharedSubscribers | None:
        """Where the nodes of a cluster record their Mercure subscribers (``None`` on one
        server, or while not running)."""
        store = self._shared.opened_store
        return store.subscribers if store is not None and self._shared.started else None

    def now(self) -> float:
        """Seconds since the epoch, from the server's clock (injectable in tests)."""
        return self._clock()

    @property
    def tally(self) -> Tally:
        """What ``/metrics`` reports: task counters, histograms, queue depths."""
        return self._shared.tally

    @property
    def store(self) -> Store:
        """The store; ``ServerClosed`` when the server is not running."""
        return self._shared.store

    def poke(self) -> None:
        """Re-check due times now (after an injected clock moved)."""
        self._shared.due_wake.set()

    # --- enqueue: see ``runtime/enqueue.py`` ---------------------------------------

    # ``submit`` and ``task`` hand back the part's coroutine: no frame of their own per task.
    def submit(self, data: Any, **options: Any) -> Coroutine[Any, Any, Submitted]:
        """Enqueue one task; like ``task`` but says whether a unique key matched.

        Options: ``name``, ``queue``, ``priority``, ``delay`` (s) or ``available_at``
        (epoch s), ``serial_group``, ``unique_key``, ``unique_for`` (s: a task with
        the key that succeeded that recently also counts), ``timeout`` (s),
        ``max_attempts``, ``retry`` (a ``RetryPolicy``). Raises
        ``ValidationError``/``NotSerializable`` naming the field (nothing written),
        ``ServerBusy`` when full, ``ServerClosed`` while stopping.
        """
        return self._enqueue.submit(data, **options)

    def submit_parsed(
        self, data: Any, options: dict[str, Any]
    ) -> Coroutine[Any, Any, tuple[int, TaskState | None, bool]]:
        """``submit`` for data parsed from JSON just now that nobody else holds (what the
        HTTP API does per request): the worker gets ``data`` itself, not a copy decoded
        from its text. Answers ``(id, state, existing)``, the fields of ``Submitted``
        (``state`` is ``None`` for an existing task). Raises as ``submit``."""
        return self._enqueue.submit_parsed(data, options)

    def task(self, data: Any, **options: Any) -> Coroutine[Any, Any, int]:
        """Enqueue one task and return its id once it is durable. Options as ``submit``."""
        return self._enqueue.task(data, **options)

    async def task_many(self, items: Iterable[Any], **options: Any) -> list[Submitted]:
        """Enqueue many tasks in one transaction: all or none.

        Each item is a ``TaskSpec`` (its options override ``options``) or plain data.
        A bad item raises ``ValidationError`` naming it (``tasks[3].timeout``) and
        nothing is written; so does a batch with more new tasks than ``max_queued``
        (it could never fit). ``ServerBusy`` means it would fit in an emptier queue.
        """
        return await self._enqueue.task_many(items, **options)

    def topic(self, task_id: int) -> str:
        """The topic (an IRI) on which a task's events are published."""
        return self._shared.topic(task_id)

    def set_public_url(self, url: str) -> None:
        """Set the URL task topics are built on (the CLI calls it once the port is known)."""
        if not self.settings.base_url:
            self._shared.topic_prefix = f"{url.rstrip('/')}/tasks/"

    # --- look and act ------------------------------------------------------------

    async def get(self, task_id: int) -> Task:
        """The task's committed state; ``TaskNotFound`` when there is none."""
        return await self._control.get(task_id)

    async def list_tasks(
        self,
        *,
        state: TaskState | None = None,
        after: int = 0,
        limit: int = 100,
        before: int | None = None,
        queue: str | None = None,
        name: str | None = None,
        unique_key: str | None = None,
    ) -> list[Task]:
        """One page of tasks: ids above ``after`` in id order, or below ``before`` newest
        first; only those in ``state``, of ``queue``, with ``name`` / ``unique_key``."""
        return await self.store.list_tasks(
            state=state,
            after=after,
            limit=limit,
            before=before,
            queue=queue,
            name=name,
            unique_key=unique_key,
        )

    async def cancel(self, task_id: int) -> Task:
        """Cancel a task that has not ended and return it, cancelled.

        Raises ``TaskNotFound``, or ``Conflict`` when it has already ended.
        """
        return await self._control.cancel(task_id)

    async def retry(self, task_id: int) -> Task:
        """Re-queue a failed or cancelled task, attempts reset; ``Conflict`` otherwise."""
        return await self._control.retry(task_id)

    async def retry_failed(self, limit: int = 10_000) -> list[int]:
        """Re-queue up to ``limit`` failed tasks; returns the ids re-queued."""
        return await self._control.retry_failed(limit)

    async def purge(self, older_than: float, states: Iterable[TaskState] = TERMINAL_ORDER) -> int:
        """Delete ended tasks (and their events) that finished over ``older_than`` s ago."""
        return await self._control.purge(older_than, states)

    async def bulk(self, action: Action, ids: list[int]) -> BulkResult:
        """Retry, cancel or purge each of ``ids``; what could not be done is in ``errors``."""
        return await self._bulk.by_ids(action, ids)

    async def bulk_where(
        self, action: Action, where: Where, *, limit: int = 10_000, after: int = 0
    ) -> BulkResult:
        """``bulk`` on up to ``limit`` tasks ``where`` matches (ids above ``after``), read
        and acted on a page at a time; ``next_after`` says where to go on."""
        return await self._bulk.by_filter(action, where, limit=limit, after=after)

    async def pause_queue(self, name: str) -> None:
        """Start no more tasks of queue ``name`` (it still takes new ones), across
        restarts; running tasks go on. ``ValidationError`` for a bad name."""
        await self._control.pause_queue(name, True)

    async def resume_queue(self, name: str) -> None:
        """Undo ``pause_queue``: its tasks start again."""
        await self._control.pause_queue(name, False)

    def paused_queues(self) -> list[str]:
        """Names of the paused queues, sorted."""
        return self._shared.ready.paused()

    async def wait_terminal(self, task_id: int, timeout: float | None = None) -> Task:
        """Wait until the task has ended (its terminal event is committed); return it.

        Raises ``TaskNotFound``, or ``TimeoutError`` after ``timeout`` seconds.
        """
        return await self._control.wait_terminal(task_id, timeout)

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
        shared = self._shared
        pool, store = shared.pool, shared.opened_store
        busy = pool.busy if pool else 0
        total = self.settings.task_workers
        counts = {state.value: n for state, n in shared.counts.totals.items()}
        processes = pool.processes if pool else None
        return {
            "workers": {"total": total, "busy": busy, "idle": total - busy},
            "tasks": counts,
            **{k: counts[k] for k in ("queued", "running", "succeeded", "failed", "cancelled")},
            "ready": len(shared.ready),
            "backlog_on_disk": shared.ready.has_backlog,
            "queues": shared.ready.snapshot(),
            "processes": {"recycled": processes.recycled, "crashed": processes.crashed}
            if processes
            else None,
            "subscribers": len(self.fanout),
            "commits": store.commits if store else 0,
            "failed_commits": store.failed_commits if store else 0,
            "last_event_id": store.committed_event_id if store else 0,
            **(
                {"node": self.node_name, "nodes": shared.nodes}
                if store is not None and store.shared
                else {}
            ),
        }

    def history(self) -> dict[str, Any]:
        """The last hour per minute: tasks started, succeeded, failed, retried, and the
        mean and longest queue wait (``runtime/history.py``); from memory."""
        return self._shared.history.to_json()

    async def queue_stats(self) -> dict[str, dict[str, Any]]:
        """Per queue: tasks that have not ended, by state (zeros included), whether it is
        paused, and the queue's priority, concurrency limit and what it holds in memory.
        The ``default`` queue is always there, idle or not. On SQLite O(queues): the
        counts are kept as tasks move (``runtime/counts.py``), not counted from the rows;
        on a shared database they are the cluster's, read from it."""
        counts = await self._shared.counts.active_by_queue()
        memory = self._shared.ready.snapshot()
        out: dict[str, dict[str, Any]] = {}
        for name in sorted(set(counts) | set(memory) | {"default"}):
            by_state = counts.get(name, {})
            row: dict[str, Any] = {state.value: by_state.get(state, 0) for state in ACTIVE_ORDER}
            row.update(paused=False, concurrency=None, priority=0)
            held = memory.get(name)
            if held is not None:
                if not self.store.shared:  # live, where the store lags a commit
                    row["running"] = held["running"]
                row.update({k: v for k, v in held.items() if k != "running"})
            out[name] = row
        return out

    # --- events --------------------------------------------------------------------

    def subscribe(self, task_id: int | None = None) -> Subscription[Event]:
        """A subscription to one task's events, or to all. Close it when done.

        On a shared database the other servers are told to notify this one at once
        (``follow_events``, not awaited here: the events they commit meanwhile come
        with the next notification or commit seen here)."""
        if task_id is None:
            subscription = self.fanout.subscribe(match_all=True)
        else:
            subscription = self.fanout.subscribe((self.topic(task_id),))
        store = self._shared.opened_store
        if store is not None and store.shared:
            follow = asyncio.get_running_loop().create_task(self._follow_quietly())
            self._follows.add(follow)  # held until done: the loop keeps weak references
            follow.add_done_callback(self._follows.discard)
        return subscription

    async def follow_events(self) -> None:
        """Await before starting to listen for events (a stream, a waiter): on a shared
        database the other servers notify this one of their events from now on, and
        ``committed_event_id`` is the cluster's (``Store.follow_events``)."""
        store = self._shared.opened_store
        if store is not None and store.shared:
            await store.follow_events()

    async def _follow_quietly(self) -> None:
        try:
            await self.follow_events()
        except Exception as exc:  # the database is away: the cluster loop follows later
            log.warning("could not follow the cluster's events yet: %s", exc)

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

    def is_running(self, task_id: int) -> bool:
        """True while a worker runs the task (its ``running`` row may not be committed yet)."""
        return self._shared.is_running(task_id)


def _result_of(task: Task) -> Any:
    if task.state is lifecycle.SUCCEEDED:
        return task.result
    if task.state is lifecycle.CANCELLED:
        raise TaskCancelled(task.id)
    raise TaskFailed(task.id, task.error)
