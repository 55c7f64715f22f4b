"""Outcomes: what the writer and the workers tell the server, wired here.

After every commit the engine calls ``committed`` (count, push the events, free
what ended), then ``feed`` (offer ready tasks to the workers); ``not_stored`` when
a batch with new tasks failed. Workers call ``report`` and ``progress``; the ready
queue asks ``page_in`` and ``group_head`` for tasks waiting on disk.
"""

from __future__ import annotations

from typing import Any, Protocol

from .. import lifecycle
from ..models import TERMINAL_EVENTS, Event, EventType, Task
from ..storage import Durable
from .shared import Shared

#: Looked up once: ``EventType.X`` is a lookup on the enum class, ~70 ns more than a
#: global on Python 3.11, and these run per task.
_STARTED, _PROGRESS, _FINISHED = EventType.STARTED, EventType.PROGRESS, EventType.FINISHED


class Publisher(Protocol):
    """Where committed events go (the fan-out to SSE and Mercure subscribers)."""

    def publish(self, topics: tuple[str, ...], item: Event) -> Any: ...

    def __len__(self) -> int: ...


class Outcomes:
    """Keeps the shared counts exact and pushes events, as batches commit."""

    def __init__(self, shared: Shared, fanout: Publisher) -> None:
        self._s = shared
        self._fanout = fanout

    def committed(self, durable: Durable) -> None:
        """``on_commit``: runs in the writer after every commit: bookkeeping, then push
        the events to the fan-out."""
        if durable.delayed:
            self._s.due_wake.set()
        if durable.inserted:
            self._s.tally.committed(durable.inserted)
        fanout = self._fanout
        publish = fanout.publish if len(fanout) else None  # nobody listens: skip the topics
        prefix = self._s.topic_prefix
        for event in durable.events:
            if event.task_id is None:
                if publish is not None:
                    publish(event.topics, event)
                continue
            if publish is not None:
                publish((f"{prefix}{event.task_id}",), event)
            if event.type in TERMINAL_EVENTS:
                self.ended(event.task_id)
        if durable.queues:  # the batch's chores made tasks ready there (rescued): claim
            self._s.ready.start_from_disk(durable.queues)

    def feed(self, tasks: list[Task]) -> None:
        """``on_ready``: runs in the writer after the callers of a batch resumed: wake
        the workers."""
        offer = self._s.ready.offer
        for task in tasks:
            offer(task)

    def not_stored(self, tasks: list[Task]) -> None:
        """``on_failed``: a batch with these new tasks failed to commit: forget what
        ``Enqueue`` counted."""
        for task in tasks:
            self._s.counts.add(task.queue, task.state, -1)
            if task.state is lifecycle.QUEUED:
                self._s.tally.unqueued(task)
            self.ended(task.id)

    def ended(self, task_id: int) -> None:
        """The task ended (or was never stored): free its group, key and waiters."""
        self._s.ready.release(task_id)
        self._s.unique.release(task_id)
        self._s.waiters.ended(task_id)

    def page_in(self, queue: str, limit: int, busy_groups: list[str]) -> None:
        """The ready queue asks for queued tasks from disk; delivered after a commit."""
        ready = self._s.ready
        self._s.store.page_queued(
            queue,
            limit,
            busy_groups,
            lambda tasks: ready.deliver(queue, tasks),
            ready.limit_of(queue),
        )

    def group_head(self, group: str) -> None:
        """The ready queue asks for a serial group's next task from disk."""
        self._s.store.group_head(
            group, lambda tasks: self._s.ready.deliver_head(group, tasks[0] if tasks else None)
        )

    def report(self, task: Task, type_: EventType, extra: dict[str, Any] | None) -> None:
        """A worker's outcome (``started``, ``retrying``, ``finished`` ...): stored, counted."""
        self._s.store.update_task(task, type_, extra)  # NotSerializable propagates to the pool
        counts, tally = self._s.counts, self._s.tally
        if type_ is _STARTED:
            counts.move(task.queue, lifecycle.QUEUED, lifecycle.RUNNING)
            tally.started(task)
            at = task.updated_at  # now: update_task set it
            self._s.history.started(at, at - task.available_at)
        elif type_ is not _PROGRESS:
            counts.move(task.queue, lifecycle.RUNNING, task.state)
            tally.attempt_ended(task, task.finished_at or self._s.clock())
            if type_ is _FINISHED:
                self._s.history.succeeded(task.updated_at)
            elif type_ is EventType.FAILED:
                self._s.history.failed(task.updated_at)
            elif type_ is EventType.RETRYING:
                self._s.history.retried(task.updated_at)

    def progress(self, task: Task, fraction: float, message: str | None) -> Any:
        """A running task's progress: stored with its event; the batch's future."""
        message = message or None  # an empty message is none (the store relies on it)
        task.progress, task.message = fraction, message
        extra: dict[str, Any] = {"progress": fraction, "message": message}
        return self._s.store.update_task(task, EventType.PROGRESS, extra)
