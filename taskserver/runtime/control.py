"""Acting on stored tasks: look them up, cancel, retry, purge, wait for their end.

Each keeps the shared counts exact: a conditional move answers the state it
moved the task from, and purges go one ended state at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from .. import lifecycle
from ..errors import Conflict, TaskNotFound, ValidationError
from ..lifecycle import RETRYABLE, TERMINAL, TERMINAL_ORDER
from ..models import EventType, Task, TaskState
from .shared import Shared

#: Longest queue name (as ``options.LABEL``).
MAX_LABEL = 200
#: Ended tasks deleted per writer round when purging.
PURGE_CHUNK = 5_000


class Control:
    """``get``, ``cancel``, ``retry``, ``retry_failed``, ``purge`` and ``wait_terminal``."""

    def __init__(self, shared: Shared) -> None:
        self._s = shared

    async def get(self, task_id: int) -> Task:
        """The task's committed state; ``TaskNotFound`` when there is none."""
        task = await self._s.store.get_task(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def wait_terminal(self, task_id: int, timeout: float | None = None) -> Task:
        """Wait until the task has ended (its terminal event is committed); return it.

        Raises ``TaskNotFound``, or ``TimeoutError`` after ``timeout`` seconds.
        """
        store = self._s.store
        if store.shared:  # its end may commit on another server: be told of it
            await store.follow_events()
        return await self._s.waiters.wait_terminal(task_id, self.get, timeout)

    async def cancel(self, task_id: int) -> Task:
        """Cancel a task that has not ended and return it, cancelled.

        Raises ``TaskNotFound``, or ``Conflict`` when it has already ended.
        """
        store = self._s.store
        if self._s.pool is not None and self._s.pool.cancel(task_id):
            return await self.wait_terminal(task_id, timeout=self._s.settings.grace_period + 5)
        # Tombstoned before any await: no page may take it in while we decide.
        self._s.ready.tombstone(task_id)
        try:
            task = self._s.ready.remove(task_id)
            if task is not None:  # waiting in memory: ours to write
                lifecycle.end(task, lifecycle.CANCELLED, self._s.clock())
                # the ready queue holds queued tasks only
                self._s.counts.move(task.queue, lifecycle.QUEUED, lifecycle.CANCELLED)
                self._s.tally.unqueued(task)
                self._s.tally.ended(task)
                await store.update_task(task, EventType.CANCELLED)
                return task
            # Its queue first (it never changes), so the counts move with the answer.
            queue = (await self.get(task_id)).queue
            previous = await store.cancel_pending(task_id)
            if previous is not None:
                self._s.counts.move(queue, previous, lifecycle.CANCELLED)
        finally:
            self._s.ready.untombstone(task_id)
        if previous is not None:
            cancelled = await self.get(task_id)
            if previous is lifecycle.QUEUED:
                self._s.tally.unqueued(cancelled)
            self._s.tally.ended(cancelled)
            return cancelled
        current = await self.get(task_id)
        if current.state in TERMINAL:
            raise Conflict(f"task {task_id} has already ended ({current.state.value})")
        if store.shared and current.state is lifecycle.RUNNING:
            # Claimed by some server of the cluster (maybe this one, a moment ago):
            # every server hears the request, the one holding it stops it.
            await store.backend.request_cancel(task_id)
            return await self.wait_terminal(task_id, timeout=self._s.settings.grace_period + 5)
        raise Conflict(f"task {task_id} is {current.state.value} and cannot be cancelled now")

    def cancel_requested(self, task_id: int) -> None:
        """A server sharing the database asks for ``task_id`` to be cancelled: stop it
        if this server runs it or holds it claimed; else nothing."""
        if not self._s.started:
            return
        pool = self._s.pool
        if pool is not None and pool.cancel(task_id):
            return
        task = self._s.ready.remove(task_id)
        if task is not None:
            lifecycle.end(task, lifecycle.CANCELLED, self._s.clock())
            self._s.tally.ended(task)
            self._s.store.update_task(task, EventType.CANCELLED)

    async def retry(self, task_id: int) -> Task:
        """Re-queue a failed or cancelled task, attempts reset; ``Conflict`` otherwise."""
        unique = self._s.unique
        before = await self.get(task_id)
        if before.state not in RETRYABLE:
            raise Conflict(
                f"task {task_id} is {before.state.value}; only failed or cancelled "
                "tasks can be retried"
            )
        holder = None if before.unique_key is None else unique.by_key.get(before.unique_key)
        if holder is not None:
            raise Conflict(f"task {holder} with the same unique_key is still active")
        # Tombstoned until we offer it ourselves: a page must not take it in first.
        self._s.ready.tombstone(task_id)
        try:
            previous = await self._s.store.retry_ended(task_id)
            if previous is None:
                raise Conflict(f"task {task_id} changed state meanwhile; try again")
            self._s.counts.move(before.queue, previous, lifecycle.QUEUED)
            task = await self.get(task_id)
            self._s.tally.queued(task)
        finally:
            self._s.ready.untombstone(task_id)
        if task.unique_key is not None:
            unique.hold(task.unique_key, task.id)
        if task.state is lifecycle.QUEUED:
            self._s.ready.offer(task)
        return task

    async def retry_failed(self, limit: int = 10_000) -> list[int]:
        """Re-queue up to ``limit`` failed tasks; returns the ids re-queued."""
        done: list[int] = []
        await self._s.store.caught_up()  # every failure counted is on disk
        for task_id in await self._s.store.ids_in_state(lifecycle.FAILED, limit):
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
        cutoff = self._s.clock() - older_than
        total = 0
        for state in dict.fromkeys(states):
            # One state at a time, so the in-memory counters stay exact: ended tasks
            # change state only through the writer, which runs these in order.
            while True:
                deleted = await self._s.store.purge((state,), cutoff, chunk=PURGE_CHUNK)
                self._s.counts.purged(state, deleted)
                total += deleted
                if deleted < PURGE_CHUNK:
                    break
        return total

    async def pause_queue(self, name: str, paused: bool) -> None:
        """Pause (``paused``) or resume queue ``name``, durably: once this returns, a
        restart finds it so. Pausing takes effect at once (no new start meanwhile);
        a write that fails undoes it and raises (``ServerBusy``)."""
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_LABEL:
            raise ValidationError(f"a queue name is 1-{MAX_LABEL} characters", field="name")
        ready = self._s.ready
        was = name in ready.paused()
        if paused:
            ready.pause(name)
        try:
            await self._s.store.pause_queue(name, paused)
        except BaseException:
            if paused and not was:
                ready.resume(name)
            raise
        if not paused:
            ready.resume(name)
