"""Appending intents to the current batch: what every write of the server becomes.

``Engine`` (``engine.py``) is a ``Batching``: these methods run on the loop,
synchronously, and return the future of the batch they joined (or of their own
answer); the engine's writer commits the batch and resolves them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from .. import lifecycle
from ..errors import NotSerializable, ServerBusy
from ..lifecycle import TERMINAL
from ..models import Event, EventType, Task, TaskState
from .backend import Backend
from .intents import (
    Batch,
    Chore,
    CommitFuture,
    Deliver,
    DueTasks,
    GroupHead,
    Lease,
    Move,
    NewTask,
    PageQueued,
    Purge,
    QueuePause,
    TrimEvents,
)
from .payload import dumps, event_json

#: Looked up once: ``EventType.X`` is a lookup on the enum class, ~70 ns more than a
#: global on Python 3.11, and these run per task.
_QUEUED, _STARTED, _FINISHED = EventType.QUEUED, EventType.STARTED, EventType.FINISHED
_QUEUED_STATE, _SUCCEEDED, _DELAYED = lifecycle.QUEUED, lifecycle.SUCCEEDED, lifecycle.DELAYED


class Batching:
    """The append half of ``Engine``; the engine sets these attributes."""

    backend: Backend
    _batch: Batch | None
    _wake: asyncio.Event
    _closing: bool
    _max_pending: int
    _clock: Callable[[], float]
    _task_id: Callable[[], int]
    _event_id: Callable[[], int]
    _encode_new: Callable[[Task, str], Any]
    _encode_update: Callable[[Task, str | None], Any]
    _started: Callable[[int, int, int], int | None]

    def _current(self) -> Batch:
        if self._batch is None:
            self._batch = Batch(future=CommitFuture(loop=asyncio.get_running_loop()))
            self._wake.set()
        return self._batch

    def _check_room(self, extra: int) -> Batch:
        if self._closing:
            raise ServerBusy("the store is closing")
        batch = self._batch
        if batch is None:
            batch = self._current()
        if len(batch) + extra > self._max_pending:
            raise ServerBusy("too many writes are waiting for the disk", retry_after=1.0)
        return batch

    def _new_event(
        self,
        batch: Batch,
        task: Task,
        type_: EventType,
        extra: dict[str, Any] | None,
        now: float,
        result: str | None = None,
    ) -> None:
        json = event_json(task, type_, extra, now, result=result)
        batch.events.append(Event(self._event_id(), task.id, type_, json))

    def insert_tasks(
        self, items: Sequence[NewTask], *, schedule: tuple[str, float] | None = None
    ) -> tuple[list[Task], asyncio.Future[None]]:
        """Append new tasks and their events to the current batch; all commit together.

        A task whose ``available_at`` is in the future starts ``waiting``, else
        ``queued``. ``schedule`` = ``(name, due)`` records in the same transaction
        that a periodic schedule has enqueued its run for ``due``. Returns the
        tasks (ids assigned, increasing) and the batch future, done at commit.
        Raises ``ServerBusy`` when the batch is full; then nothing was appended.
        """
        batch = self._check_room(2 * len(items))
        now = self._clock()
        tasks = [self._add_task(batch, item, item.text, item.data, now) for item in items]
        if schedule is not None:
            batch.schedule_runs.append(schedule)
            batch.schedule_ids.setdefault(schedule[0], []).extend(t.id for t in tasks)
        return tasks, batch.future

    def insert_task(
        self, options: NewTask, text: str, data: Any
    ) -> tuple[Task, asyncio.Future[None]]:
        """``insert_tasks`` of one task: ``options``' resolved options with this data.

        ``text`` is the data's JSON; ``options.text`` and ``options.data`` are not
        used, so one resolved ``NewTask`` serves every task with the same options.
        """
        batch = self._check_room(2)
        return self._add_task(batch, options, text, data, self._clock()), batch.future

    def _add_task(self, batch: Batch, item: NewTask, text: str, data: Any, now: float) -> Task:
        due = now if item.available_at is None else item.available_at
        # Positional: a dataclass takes them faster than keywords (this runs per task).
        task = Task(
            self._task_id(),
            data,
            lifecycle.initial_state(due, now),
            item.max_attempts,
            item.timeout,
            now,
            now,
            item.queue,
            item.priority,
            due,
            item.name,
            item.serial_group,
            item.unique_key,
            item.retry,
        )
        batch.inserts.append(self._encode_new(task, text))
        batch.inserted.append(task)
        if item.unique_for:
            batch.unique_since[task.id] = now - item.unique_for
        if task.state is _QUEUED_STATE:
            batch.ready.append(task)
            self._new_event(batch, task, _QUEUED, None, now)
        else:
            batch.delayed = True
            self._new_event(batch, task, _QUEUED, {"available_at": due}, now)
        return task

    def update_task(
        self,
        task: Task,
        type_: EventType,
        extra: dict[str, Any] | None = None,
        *,
        ready: bool = False,
    ) -> asyncio.Future[None]:
        """Write ``task``'s current state as a whole row, with an event, in the current batch.

        The caller owns ``task`` (a worker while it runs, the ready queue while it
        waits), so a full-row write cannot undo someone else's change. A task
        that succeeded has its ``result`` encoded here: ``NotSerializable`` is raised
        (and nothing appended) when it cannot be. ``ready`` hands the task to
        ``on_commit`` as ready to run. Never refused: outcomes of running work
        must not be lost. The returned future is the batch's, done at commit.
        A ``finished`` event carries the task's ``result`` (encoded once, for the
        row and the event), so ``extra`` must not. A ``started`` one is also
        recorded by ``Backend.started`` when this returns, so the attempt counts
        even if the process dies before the commit.
        """
        result = None
        if type_ is _FINISHED or (task.state is _SUCCEEDED and task.result is not None):
            try:
                result = dumps(task.result)
            except TypeError as exc:
                raise NotSerializable(
                    f"the task's result cannot be encoded as JSON: {exc}", field="result"
                ) from None
        batch = self._batch
        if batch is None:
            batch = self._current()
        now = self._clock()
        task.updated_at = now
        json = event_json(task, type_, extra, now, result=result if type_ is _FINISHED else None)
        event_id = self._event_id()
        if type_ is _STARTED:
            token = self._started(task.id, task.attempts, event_id)
            if token is not None:
                batch.retire.append(token)
        batch.updates[task.id] = self._encode_update(task, None if task.result is None else result)
        batch.events.append(Event(event_id, task.id, type_, json))
        if ready:
            batch.ready.append(task)
        elif task.state in _DELAYED:
            batch.delayed = True
        return batch.future

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
        """Append an update published to the hub (no task) to the current batch.

        It is stored in the same sequence as task events, so one ``Last-Event-ID``
        replays both in order. ``uid`` need not be unique. Raises ``ServerBusy``
        when the batch is full.
        """
        batch = self._check_room(1)
        event = Event(self._event_id(), None, type_, data, topics, private, uid, retry)
        batch.events.append(event)
        return event, batch.future

    def _move(
        self, kind: Literal["cancel", "retry"], task_id: int
    ) -> asyncio.Future[TaskState | None]:
        batch = self._check_room(2)
        # The event id is taken now, so ids stay in commit order; unused, it is a gap.
        future: asyncio.Future[TaskState | None] = CommitFuture(loop=asyncio.get_running_loop())
        batch.moves.append(Move(kind, task_id, self._event_id(), self._clock(), future))
        return future

    def cancel_pending(self, task_id: int) -> asyncio.Future[TaskState | None]:
        """Cancel a task that waits on disk (``lifecycle.ON_DISK``), atomically.

        Resolves to the state it was in when this call moved it to ``cancelled``
        (its event is then committed), to ``None`` when it was in another state or
        does not exist.
        """
        return self._move("cancel", task_id)

    def retry_ended(self, task_id: int) -> asyncio.Future[TaskState | None]:
        """Re-queue a failed or cancelled task with its attempts reset, atomically.

        Resolves to the state it left when it moved (its event then committed),
        else ``None``.
        """
        return self._move("retry", task_id)

    def purge(
        self,
        states: Iterable[TaskState],
        before: float,
        *,
        chunk: int = 5_000,
        ids: Iterable[int] | None = None,
    ) -> asyncio.Future[int]:
        """Delete up to ``chunk`` ended tasks in ``states`` finished before ``before``
        (with ``ids``: only among those).

        Their events go too. Resolves to the number of tasks deleted; call again
        until it is below ``chunk``.
        """
        names = tuple(TaskState(s) for s in states)
        if not names or any(s not in TERMINAL for s in names):
            raise ValueError("purge only deletes ended tasks (succeeded, failed, cancelled)")
        return self._chore(Purge(names, before, chunk, None if ids is None else tuple(ids)))

    def pause_queue(self, name: str, paused: bool) -> asyncio.Future[int]:
        """Record that queue ``name`` is paused or not (``QueuePause``); done at commit."""
        return self._chore(QueuePause(name, paused))

    def trim_events(
        self, *, before: float | None, keep: int | None, chunk: int = 20_000
    ) -> asyncio.Future[int]:
        """Delete up to ``chunk`` events older than ``before`` or beyond the newest ``keep``."""
        up_to = None if keep is None else self.backend.last_event_id - keep
        return self._chore(TrimEvents(before, up_to, chunk))

    def lease(self, info: str) -> asyncio.Future[int]:
        """Renew this server's lease and rescue the tasks of servers whose lease ran out
        (a shared backend; see ``Lease``). Resolves to the number of tasks rescued."""
        return self._chore(Lease(info))

    def _chore(self, chore: Chore) -> asyncio.Future[int]:
        future: asyncio.Future[int] = CommitFuture(loop=asyncio.get_running_loop())
        self._check_room(1).chores.append((chore, future))
        return future

    def page_queued(
        self,
        queue: str,
        limit: int,
        busy_groups: list[str],
        deliver: Deliver,
        concurrency: int | None = None,
    ) -> None:
        """Ask the writer for the first ``limit`` queued tasks of ``queue``, in run order,
        leaving out tasks of the serial groups in ``busy_groups``. On a shared backend
        these are *claimed* for this server (``Backend.shared``), at most
        ``concurrency`` running in the queue over every server.

        ``deliver`` is called from the writer after the current batch commits and
        before the next starts, so no commit slips between query and delivery.
        It must not block.
        """
        read = PageQueued(queue, limit, tuple(busy_groups), concurrency)
        self._current().reads.append((read, deliver))

    def group_head(self, group: str, deliver: Deliver) -> None:
        """Ask the writer for the oldest task of serial group ``group`` that has not ended
        (queued, waiting or retrying); ``deliver`` gets a list of at most one."""
        self._current().reads.append((GroupHead(group), deliver))

    def due_tasks(self, now: float, limit: int, deliver: Deliver) -> None:
        """Ask the writer for up to ``limit`` waiting/retrying tasks due by ``now``.

        ``deliver`` gets them as the writer sees them, and may append updates
        (which land in the next batch, with ids in order).
        """
        self._current().reads.append((DueTasks(now, limit), deliver))
