"""The worker pool: runs the ``task`` callback for each ready task, then ``finish``.

``task_workers`` workers each take one task at a time from the ready queue, so
at most that many tasks run at once. How a callback runs depends on what it is:

* ``async def``: on the event loop (it must not block it);
* a plain function: in a thread pool of ``task_workers`` threads;
* a plain function registered with ``cpu_bound=True``: in a process pool, the only
  way past the GIL; it must be importable (a module-level function) and its
  data and result picklable.

What each kind of callback is given, its context, is in ``context.py``.

The pool decides outcomes (succeeded, retrying, waiting, failed, cancelled) and
reports them through the ``report`` function it is handed; it never touches the
store or the hub itself. Hooks (``before``, ``after``, ``error``) run around every
task with the same context; a failing hook is recorded, never fatal. Reports
are synchronous appends to the next group commit: a worker does not wait for
the disk between tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import multiprocessing
import os
import random
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .. import lifecycle
from ..errors import PermanentError, RetryLater
from ..models import EventType, RetryPolicy, Task, TaskState
from .context import (
    ProcessTaskContext,
    ProgressSink,
    SyncTaskContext,
    TaskContext,
    init_process,
    run_in_process,
)
from .processes import ProcessSlots
from .tuning import RuntimeTuning

log = logging.getLogger(__name__)

#: Looked up once: ``EventType.X`` is a lookup on the enum class, ~70 ns more than a
#: global on Python 3.11, and these run per task.
_STARTED, _FINISHED = EventType.STARTED, EventType.FINISHED

#: Names of the threads that run plain-function task callbacks (and only those).
TASK_THREAD_PREFIX = "taskserver-task"

Kind = Literal["async", "thread", "process"]


# --- callbacks ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Callback:
    """A registered callback and how to run it."""

    fn: Callable[..., Any]
    kind: Kind

    @classmethod
    def of(cls, fn: Callable[..., Any], *, cpu_bound: bool = False) -> Callback:
        if not callable(fn):
            raise TypeError(f"callback must be callable, got {fn!r}")
        # An object with ``async def __call__`` is a coroutine function too.
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - the method, not callable()
        ):
            if cpu_bound:
                raise TypeError("cpu_bound callbacks must be plain functions, not async def")
            return cls(fn, "async")
        return cls(fn, "process" if cpu_bound else "thread")


#: What a callback may raise and cost only its task. SystemExit too: library code
#: (argparse, click) calls sys.exit(), and it must not stop the whole server.
CALLBACK_ERRORS = (Exception, SystemExit)


def _about(task: Task) -> dict[str, Any]:
    """A log line's ``extra`` about ``task``: its id and queue (JSON logs show them)."""
    return {"task_id": task.id, "queue": task.queue}


def _uncancel(task: asyncio.Task[None]) -> None:
    # Every cancel() counts; all of them were for this one task.
    while task.cancelling():
        task.uncancel()


class _TimedOut(TimeoutError):
    """The pool's own timeout fired (as opposed to a TimeoutError the callback raised)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g}s")
        self.seconds = seconds


class _Run:
    """One attempt of one task on one worker; its contexts are made once and shared by
    the ``task`` callback, the hooks and ``finish``."""

    __slots__ = ("_async", "_sync", "sink", "task", "worker_id")

    def __init__(self, task: Task, worker_id: int, sink: ProgressSink) -> None:
        self.task = task
        self.worker_id = worker_id
        self.sink = sink
        self._async: TaskContext | None = None
        self._sync: SyncTaskContext | None = None

    def context(self) -> TaskContext:
        if self._async is None:
            self._async = TaskContext(self.task, self.worker_id, self.sink)
        return self._async

    def sync_context(self, loop: asyncio.AbstractEventLoop) -> SyncTaskContext:
        if self._sync is None:
            self._sync = SyncTaskContext(self.task, self.worker_id, self.sink, loop)
        return self._sync


class Report(Protocol):
    """How the pool tells the server about a task; synchronous, never blocks."""

    def __call__(self, task: Task, type_: EventType, extra: dict[str, Any] | None) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    """Recycling limits for the process slots of cpu_bound callbacks (0: none)."""

    processes: int = 0
    max_tasks: int = 0
    max_memory_mb: int = 0


class WorkerPool:
    """``size`` workers taking tasks from ``get``, running ``task`` then ``finish``.

    ``done(task)`` is called when a worker is through with a task, whatever the
    outcome, so the ready queue can free its concurrency slot.
    """

    def __init__(
        self,
        size: int,
        *,
        get: Callable[[], Awaitable[Task]],
        done: Callable[[Task], None],
        report: Report,
        progress: ProgressSink,
        callbacks: dict[str, Callback],
        retry: RetryPolicy,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.time,
        tuning: RuntimeTuning | None = None,
    ) -> None:
        self.size = size
        #: counts the thread callbacks running at once (the GIL switch interval follows)
        self._tuning = tuning or RuntimeTuning(0, 0)
        self._get = get
        self._done = done
        self._report = report
        self._progress = progress
        self._callbacks = callbacks
        self._task_cb = callbacks["task"]
        self._finish_cb = callbacks["finish"]
        self._retry = retry
        self._limits = limits
        self._clock = clock
        self._workers: list[asyncio.Task[None]] = []
        #: worker id -> the task it runs now
        self._running: dict[int, Task] = {}
        self._by_task: dict[int, int] = {}
        self._cancel_requested: set[int] = set()
        self._stopping = False
        self._threads: ThreadPoolExecutor | None = None
        self._slots: ProcessSlots | None = None
        self._progress_queue: Any = None
        self._progress_thread: threading.Thread | None = None
        self.done = 0

    def __repr__(self) -> str:
        state = " stopping" if self._stopping else ""
        return f"<WorkerPool busy={len(self._running)}/{self.size} done={self.done}{state}>"

    @property
    def busy(self) -> int:
        """Workers running a task right now."""
        return len(self._running)

    @property
    def processes(self) -> ProcessSlots | None:
        """The process slots of cpu_bound callbacks, if any."""
        return self._slots

    def is_running(self, task_id: int) -> bool:
        """True while a worker holds ``task_id``."""
        return task_id in self._by_task

    def start(self) -> None:
        """Start the workers (and the executors the callbacks need)."""
        loop = asyncio.get_running_loop()
        kinds = {cb.kind for cb in self._callbacks.values()}
        if "thread" in kinds:
            self._threads = ThreadPoolExecutor(self.size, thread_name_prefix=TASK_THREAD_PREFIX)
        if "process" in kinds:
            self._progress_queue = multiprocessing.get_context("spawn").Queue(maxsize=10_000)
            self._slots = ProcessSlots(
                self._limits.processes or os.cpu_count() or 1,
                max_tasks=self._limits.max_tasks,
                max_memory_mb=self._limits.max_memory_mb,
                initializer=init_process,
                initargs=(self._progress_queue,),
            )
            self._progress_thread = threading.Thread(
                target=self._forward_progress,
                args=(loop,),
                name="taskserver-progress",
                daemon=True,
            )
            self._progress_thread.start()
        self._workers = [
            asyncio.create_task(self._work(i), name=f"taskserver-worker-{i}")
            for i in range(self.size)
        ]

    def _forward_progress(self, loop: asyncio.AbstractEventLoop) -> None:
        # Reads progress sent by process-slot callbacks and hands it to the loop.
        while True:
            item = self._progress_queue.get()
            if item is None:
                return
            task_id, fraction, message = item
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._process_progress, task_id, fraction, message)

    def _process_progress(self, task_id: int, fraction: float, message: str | None) -> None:
        worker = self._by_task.get(task_id)
        if worker is not None:
            # Fire and forget: the process does not wait; the store keeps the batch alive.
            self._progress(self._running[worker], fraction, message)

    def _live_progress(self, task: Task, fraction: float, message: str | None) -> Awaitable[None]:
        # Progress from a context whose attempt is over (a stray background coroutine,
        # a thread that ran past its timeout) must not overwrite the task's record.
        worker = self._by_task.get(task.id)
        if worker is None or self._running.get(worker) is not task:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self._progress(task, fraction, message)

    def cancel(self, task_id: int) -> bool:
        """Cancel a running task. Returns ``False`` when no worker runs it.

        An ``async`` callback gets ``CancelledError`` at its current ``await``; a
        process callback's process is killed; a thread callback runs on (threads
        cannot be stopped) but its result is discarded and ``ctx.cancelled`` is set.
        """
        worker = self._by_task.get(task_id)
        if worker is None:
            return False
        self._cancel_requested.add(task_id)
        self._workers[worker].cancel()
        return True

    async def stop(self, grace: float) -> list[Task]:
        """Stop taking tasks; give running ones ``grace`` seconds, then interrupt them.

        Returns the tasks that were interrupted, still in state ``running``, for
        the caller to re-queue. Shuts the executors down.
        """
        self._stopping = True
        for i, worker in enumerate(self._workers):
            if i not in self._running:
                worker.cancel()
        busy = [self._workers[i] for i in self._running]
        interrupted: list[Task] = []
        if busy:
            _, pending = await asyncio.wait(busy, timeout=grace)
            interrupted = [task for i, task in self._running.items() if self._workers[i] in pending]
            for worker in pending:
                worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self._slots is not None:
            self._slots.shutdown()
            self._progress_queue.put(None)
        return interrupted

    async def _work(self, worker_id: int) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stopping:
            task = await self._get()
            self._running[worker_id] = task
            self._by_task[task.id] = worker_id
            try:
                await self._execute(task, worker_id, me)
            except asyncio.CancelledError:
                if self._stopping and task.id not in self._cancel_requested:
                    raise  # the pool is stopping: stop() re-queues the task
                # A DELETE that landed in a hook or in finish: the task is cancelled.
                _uncancel(me)
                self._end(task, lifecycle.CANCELLED, EventType.CANCELLED, None)
            except Exception:
                # A bug of ours must cost one task, never a worker.
                log.exception(
                    "worker %d failed handling task %d", worker_id, task.id, extra=_about(task)
                )
                self._end(
                    task,
                    lifecycle.FAILED,
                    EventType.FAILED,
                    {"error": "internal error in the worker; see the server log"},
                )
            finally:
                del self._running[worker_id]
                del self._by_task[task.id]
                self._cancel_requested.discard(task.id)
                self._done(task)
            self.done += 1

    async def _execute(self, task: Task, worker_id: int, me: asyncio.Task[None]) -> None:
        lifecycle.start(task, self._clock())
        self._report(task, _STARTED, {"worker": worker_id})
        run = _Run(task, worker_id, self._live_progress)
        hooks = self._callbacks
        if "before" in hooks:
            await self._hook("before", run)
        try:
            result = await self._start(self._task_cb, run, task.timeout)
        except asyncio.CancelledError as exc:
            if me.cancelling():
                raise  # a DELETE or a stop: _work decides
            # Not a cancel of this worker: the callback raised it (say, from a sub-task
            # something else cancelled). That is the callback failing.
            await self._fail_with(task, run, exc)
            return
        except RetryLater as exc:
            await self._hook("error", run, exc)
            self._postpone(task, exc.delay)
            return
        except CALLBACK_ERRORS as exc:
            await self._fail_with(task, run, exc)
            return
        task.result = result
        if "after" in hooks:
            await self._hook("after", run, result)
        try:
            await self._start(self._finish_cb, run, None, result)
        except asyncio.CancelledError as exc:
            if me.cancelling():
                raise
            self._finish_failed(task, exc)
        except CALLBACK_ERRORS as exc:
            self._finish_failed(task, exc)
        self._end(task, lifecycle.SUCCEEDED, _FINISHED, None)  # carries the result

    async def _fail_with(self, task: Task, run: _Run, exc: BaseException) -> None:
        if isinstance(exc, _TimedOut):
            error = f"TimeoutError: the task ran longer than its timeout of {exc.seconds:g}s"
            tb = None
        else:
            error = f"{type(exc).__name__}: {exc}"
            tb = "".join(traceback.format_exception(exc))
        await self._hook("error", run, exc)
        self._failed(task, error, tb, permanent=isinstance(exc, PermanentError))

    @staticmethod
    def _finish_failed(task: Task, exc: BaseException) -> None:
        log.error("finish callback failed for task %d", task.id, exc_info=exc, extra=_about(task))
        task.finish_error = f"{type(exc).__name__}: {exc}"

    async def _hook(self, name: str, run: _Run, *args: Any) -> None:
        hook = self._callbacks.get(name)
        if hook is None:
            return
        task = run.task
        try:
            await self._call(hook, run, None, *args)
        except asyncio.CancelledError as exc:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # a DELETE or a stop: _work decides
            self._hook_failed(task, name, exc)
        except CALLBACK_ERRORS as exc:
            self._hook_failed(task, name, exc)

    @staticmethod
    def _hook_failed(task: Task, name: str, exc: BaseException) -> None:
        log.error("%s hook failed for task %d", name, task.id, exc_info=exc, extra=_about(task))
        note = f"{name} hook: {type(exc).__name__}: {exc}"
        task.hook_error = f"{task.hook_error}; {note}" if task.hook_error else note

    def _start(
        self, cb: Callback, run: _Run, timeout: float | None, *args: Any
    ) -> Coroutine[Any, Any, Any]:
        """The coroutine running ``cb``: the callback's own when it is ``async`` with no
        timeout (most are: two coroutine frames fewer per call), else ``_call``'s."""
        if cb.kind == "async" and not timeout:
            return cb.fn(run.context(), *args)  # type: ignore[no-any-return]
        return self._call(cb, run, timeout, *args)

    async def _call(self, cb: Callback, run: _Run, timeout: float | None, *args: Any) -> Any:
        if not timeout:  # the common case skips the timeout machinery
            return await self._invoke(cb, run, *args)
        limit = asyncio.timeout(timeout)
        try:
            async with limit:
                return await self._invoke(cb, run, *args)
        except TimeoutError:
            if limit.expired():  # ours, not a TimeoutError the callback raised itself
                raise _TimedOut(timeout) from None
            raise

    async def _invoke(self, cb: Callback, run: _Run, *args: Any) -> Any:
        if cb.kind == "async":
            return await cb.fn(run.context(), *args)
        task = run.task
        if cb.kind == "process":
            assert self._slots is not None
            ctx = ProcessTaskContext(task.id, task.data, task.attempts, run.worker_id)
            return await self._slots.run(run_in_process, cb.fn, ctx, *args)
        loop = asyncio.get_running_loop()
        sync_ctx = run.sync_context(loop)
        try:
            return await loop.run_in_executor(
                self._threads, self._tuning.run_in_thread, cb.fn, sync_ctx, *args
            )
        except asyncio.CancelledError:
            sync_ctx.cancelled = True
            raise

    def _postpone(self, task: Task, delay: float) -> None:
        # RetryLater: wait without spending an attempt.
        lifecycle.postpone(task, self._clock() + delay)
        self._report(task, EventType.WAITING, {"available_at": task.available_at})

    def _failed(self, task: Task, error: str, tb: str | None, *, permanent: bool) -> None:
        task.error, task.traceback = error, tb
        if permanent or lifecycle.out_of_attempts(task):
            self._end(task, lifecycle.FAILED, EventType.FAILED, {"error": error})
            return
        delay = (task.retry or self._retry).delay(task.attempts, random.random())
        lifecycle.retry_later(task, self._clock() + delay)
        self._report(
            task,
            EventType.RETRYING,
            {"error": error, "available_at": task.available_at, "delay": delay},
        )

    def _end(
        self, task: Task, state: TaskState, type_: EventType, extra: dict[str, Any] | None
    ) -> None:
        lifecycle.end(task, state, self._clock())
        try:
            self._report(task, type_, extra)
        except Exception as exc:  # the result could not be stored (not JSON): fail instead
            task.result = None
            task.state = lifecycle.FAILED
            task.error = f"{type(exc).__name__}: {exc}"
            self._report(task, EventType.FAILED, {"error": task.error})
