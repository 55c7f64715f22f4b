"""What a task callback is given: its context (which task, its data, which attempt, which
worker) and a way to report progress, one kind per way a callback runs (``workers.py``):
``TaskContext`` on the loop, ``SyncTaskContext`` in a thread, ``ProcessTaskContext`` in a
process slot (plain data, sent there pickled).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..models import Task


class ProgressSink(Protocol):
    """Where a context sends progress: the server stores it as a ``progress`` event."""

    def __call__(self, task: Task, fraction: float, message: str | None) -> Awaitable[None]: ...


def _check_fraction(fraction: float) -> float:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not (0.0 <= fraction <= 1.0)
    ):
        raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
    return float(fraction)


class BaseContext:
    """What every task callback is given: which task, its data, which attempt, which worker."""

    __slots__ = ("_task", "attempt", "cancelled", "data", "id", "worker_id")

    def __init__(self, task: Task, worker_id: int) -> None:
        self._task = task
        self.id: int = task.id
        self.data: Any = task.data
        self.attempt: int = task.attempts
        self.worker_id = worker_id
        #: Set when the task was cancelled or timed out; a thread callback can poll it.
        self.cancelled = False

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"<{name} task={self.id} attempt={self.attempt} worker={self.worker_id}>"


class TaskContext(BaseContext):
    """Context for ``async def`` callbacks (``task`` and ``finish``)."""

    __slots__ = ("_sink",)

    def __init__(self, task: Task, worker_id: int, sink: ProgressSink) -> None:
        super().__init__(task, worker_id)
        self._sink = sink

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Record progress (0 to 1) and push a ``progress`` event; returns once stored."""
        await self._sink(self._task, _check_fraction(fraction), message)


class SyncTaskContext(BaseContext):
    """Context for plain-function callbacks, which run in a thread."""

    __slots__ = ("_loop", "_sink")

    def __init__(
        self, task: Task, worker_id: int, sink: ProgressSink, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(task, worker_id)
        self._sink = sink
        self._loop = loop

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record progress (0 to 1); blocks this thread until it is stored.

        Ignored once the task was cancelled or timed out (``cancelled`` is set):
        the thread may run on, but the task's record is final.
        """
        fraction = _check_fraction(fraction)
        if self.cancelled:
            return

        async def send() -> None:
            await self._sink(self._task, fraction, message)

        asyncio.run_coroutine_threadsafe(send(), self._loop).result()


# --- process pool -------------------------------------------------------------

# Set in each pool process by the initializer: where progress reports go.
_progress_queue: Any = None


def init_process(progress_queue: Any) -> None:
    """A pool process's initializer: where its tasks' progress goes."""
    global _progress_queue
    _progress_queue = progress_queue


@dataclass(slots=True)
class ProcessTaskContext:
    """Context for CPU-bound callbacks, which run in another process (so it is plain data)."""

    id: int
    data: Any
    attempt: int
    worker_id: int

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Send progress (0 to 1) to the server; does not wait for it to be stored."""
        _progress_queue.put((self.id, _check_fraction(fraction), message))


def run_in_process(fn: Callable[..., object], ctx: ProcessTaskContext, *args: Any) -> object:
    """What a process slot calls: ``fn`` with its context (importable, so picklable)."""
    return fn(ctx, *args)
