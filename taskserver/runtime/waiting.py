"""Waiting for tasks to end: ``wait``, ``task_wait``, ``?wait=`` and a running cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import ServerBusy, ServerClosed
from ..lifecycle import TERMINAL
from ..models import Task

#: Waiters for task outcomes (``wait``, ``cancel``) held at once; past it, ServerBusy.
MAX_WAITERS = 100_000


class Waiters:
    """Futures per task id, resolved when the task's terminal event has committed."""

    def __init__(self, limit: int = MAX_WAITERS) -> None:
        self._limit = limit
        self._by_task: dict[int, list[asyncio.Future[None]]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Callers waiting now."""
        return self._count

    async def wait_terminal(
        self, task_id: int, get: Callable[[int], Awaitable[Task]], timeout: float | None
    ) -> Task:
        """Wait until the task has ended; return it as ``get`` reads it.

        Raises what ``get`` raises (``TaskNotFound``), ``TimeoutError`` after
        ``timeout`` seconds, ``ServerBusy`` past the limit of waiters.
        """
        if self._count >= self._limit:
            raise ServerBusy("too many callers are waiting for tasks", retry_after=1.0)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._by_task.setdefault(task_id, []).append(future)
        self._count += 1
        try:
            task = await get(task_id)  # after registering, so no ending is missed
            if task.state in TERMINAL:
                return task
            async with asyncio.timeout(timeout):
                await future
            return await get(task_id)
        finally:
            self._count -= 1
            futures = self._by_task.get(task_id)
            if futures is not None:
                if future in futures:
                    futures.remove(future)
                if not futures:
                    del self._by_task[task_id]

    def ended(self, task_id: int) -> None:
        """The task's terminal event committed: wake who waits for it."""
        for future in self._by_task.get(task_id, ()):
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        """The server stops: every waiter gets ``ServerClosed``."""
        for futures in self._by_task.values():
            for future in futures:
                if not future.done():
                    future.set_exception(ServerClosed("the server is stopping"))
                    future.exception()
        self._by_task.clear()
