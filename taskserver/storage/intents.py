"""What a batch carries to a backend: intents, never SQL.

The group-commit engine (``engine.py``) fills one ``Batch`` at a time from the
loop; a backend (``backend.py``) writes a whole batch in one transaction and
answers with ``Applied``. Rows of new and changed tasks are encoded by the
backend at append time (``Backend.encode_new`` / ``encode_update``: opaque to
the engine), so the writer thread only binds them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ..models import Event, Task, TaskState

T = TypeVar("T")

#: Gets the tasks a read asked for, on the loop, after the batch it rode in committed.
Deliver = Callable[[list[Task]], None]


class CommitFuture(asyncio.Future[T]):
    """A future the engine resolves when a batch has committed; awaiting callers share it.

    It refuses ``cancel()``: one caller giving up (a client disconnect, a
    timeout) must not fail the commit for everyone in the batch, and the write
    happens anyway. A task cancelled while it awaits one gets its
    ``CancelledError`` once the commit is done. This replaces an
    ``asyncio.shield`` per caller, which cost a future and a callback per task.
    """

    #: Set before it resolves, by a backend shared by several servers: new tasks the
    #: database kept out, ``id -> the id of the task holding its unique key`` (``None``:
    #: a periodic run another server had already enqueued; ``0``: the holder has ended
    #: since, try again).
    conflicts: dict[int, int | None] | None = None

    def cancel(self, msg: Any | None = None) -> bool:
        return False


@dataclass(slots=True)
class NewTask:
    """A validated task to insert: JSON text of its data and everything resolved."""

    text: str
    data: Any
    max_attempts: int
    timeout: float | None
    queue: str = "default"
    priority: int = 0
    available_at: float | None = None
    name: str | None = None
    serial_group: str | None = None
    unique_key: str | None = None
    retry: Any = None
    #: not stored: how long a succeeded task with the same key still counts (s)
    unique_for: float | None = None


@dataclass(slots=True)
class Move:
    """A conditional move: ``cancel`` a task that waits on disk (``lifecycle.ON_DISK``),
    or ``retry`` an ended one (``lifecycle.RETRYABLE``) with its attempts reset.

    The backend moves it only if it is in one of those states when the transaction
    runs, appends the event (``event_id``, taken at append time) if it did, and
    resolves ``future`` to the state the task left, else ``None``.
    """

    kind: Literal["cancel", "retry"]
    task_id: int
    event_id: int
    at: float
    future: asyncio.Future[TaskState | None]


@dataclass(frozen=True, slots=True)
class Purge:
    """Delete up to ``chunk`` ended tasks in ``states`` finished before ``before``, and
    their events; resolves to the number of tasks deleted. With ``ids``, only tasks
    among those ids (a selection: the dashboard's bulk purge)."""

    states: tuple[TaskState, ...]
    before: float
    chunk: int
    ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class TrimEvents:
    """Delete up to ``chunk`` events stored before ``before`` (if set), and up to
    ``chunk`` with ids at or below ``up_to`` (if set); resolves to the total."""

    before: float | None
    up_to: int | None
    chunk: int


@dataclass(frozen=True, slots=True)
class ProbeWrite:
    """A write that changes nothing but reaches the disk; resolves to 0 once committed."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A shared backend's heartbeat: renew this server's lease (``info``: what it reports
    about itself, JSON) and rescue the running tasks of servers whose lease ran out;
    resolves to the number rescued. A backend one process owns does nothing (0)."""

    info: str


@dataclass(frozen=True, slots=True)
class QueuePause:
    """Record that queue ``name`` is paused (``paused``) or no longer (``not paused``).

    Idempotent; the last write for a name wins; resolves once committed. The
    queue need not exist or hold tasks. ``Opened.paused_queues`` lists what is paused.
    """

    name: str
    paused: bool


Chore = Purge | TrimEvents | ProbeWrite | Lease | QueuePause


@dataclass(frozen=True, slots=True)
class PageQueued:
    """The first ``limit`` queued tasks of ``queue`` in run order (priority, then id),
    leaving out tasks of ``busy_groups`` and any task that is not its group's head."""

    queue: str
    limit: int
    busy_groups: tuple[str, ...]
    #: the queue's concurrency limit (a shared backend counts it over every server)
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class GroupHead:
    """The oldest task of serial group ``group`` that waits on disk (at most one)."""

    group: str


@dataclass(frozen=True, slots=True)
class DueTasks:
    """Up to ``limit`` waiting or retrying tasks due by ``now``, earliest first."""

    now: float
    limit: int


Read = PageQueued | GroupHead | DueTasks


@dataclass(slots=True)
class Batch:
    """One transaction's worth of intents, in the order they were appended."""

    future: CommitFuture[None]
    #: new task rows (``Backend.encode_new``), and the tasks themselves
    inserts: list[Any] = field(default_factory=list)
    inserted: list[Task] = field(default_factory=list)
    #: tasks that become ``queued`` when this commits (new, due, retried by a worker)
    ready: list[Task] = field(default_factory=list)
    #: one full-row write per task (``Backend.encode_update``); a later state replaces one
    updates: dict[int, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    chores: list[tuple[Chore, asyncio.Future[int]]] = field(default_factory=list)
    #: reads answered after the commit, before the next batch starts
    reads: list[tuple[Read, Deliver]] = field(default_factory=list)
    #: ``(schedule name, due time)``: periodic runs enqueued by this batch
    schedule_runs: list[tuple[str, float]] = field(default_factory=list)
    #: per schedule name, the ids of the tasks its run inserts
    schedule_ids: dict[str, list[int]] = field(default_factory=dict)
    #: a new or changed task is not ready yet (delayed): the scheduler may need to wake
    delayed: bool = False
    #: ``Backend.started`` tokens to hand to ``Backend.release`` once this committed
    retire: list[int] = field(default_factory=list)
    #: new tasks with ``unique_for``: id -> since when a success with the key counts
    #: (a shared backend checks again after the insert; see ``Writes.write``)
    unique_since: dict[int, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.events)

    def writes(self) -> bool:
        """True when the batch changes anything (a batch of reads needs no transaction)."""
        return bool(
            self.inserts
            or self.updates
            or self.events
            or self.moves
            or self.chores
            or self.schedule_runs
        )


def _nothing(*args: Any) -> None:
    return None


@dataclass(slots=True)
class Signals:
    """What a backend shared by several servers tells this one about the others
    (``Backend.bind``); the engine sets ``poke``, the server the rest. On the loop."""

    #: other servers committed events: run a batch soon, which delivers them
    poke: Callable[[], None] = _nothing
    #: some server was asked to cancel this task: stop it if it runs here
    cancel: Callable[[int], None] = _nothing
    #: other servers made tasks ready in these queues (``None``: maybe in any)
    work: Callable[[list[str] | None], None] = _nothing
    #: whether anyone here takes other servers' events (subscribers, waiters); when
    #: nobody does, a backend may skip reading them
    listening: Callable[[], bool] = lambda: True


@dataclass(slots=True)
class Durable:
    """What one batch made durable, handed to ``on_commit`` in commit order."""

    #: Tasks that became ``queued`` (new, due, retried by the worker): offer them.
    ready: list[Task]
    #: Every event the batch stored, in id order (moves' events included).
    events: list[Event]
    #: new tasks that are not ready yet (delayed): the scheduler may need to wake.
    delayed: bool
    #: queues where the batch's chores made tasks ready (a shared backend rescued them
    #: from a server whose lease ran out): claim from them.
    queues: list[str] = field(default_factory=list)
    #: the new tasks the batch stored (the engine sets it: backends need not)
    inserted: list[Task] = field(default_factory=list)


@dataclass(slots=True)
class Applied:
    """What a backend did with a batch (the engine resolves the futures on the loop)."""

    durable: Durable = field(default_factory=lambda: Durable([], [], False))
    #: per move, in order: the state it moved the task from, or None when it did not
    moved: list[TaskState | None] = field(default_factory=list)
    #: per chore, in order: rows deleted (0 for a probe)
    counts: list[int] = field(default_factory=list)
    #: per read, in order: the tasks read after the commit
    pages: list[list[Task]] = field(default_factory=list)
    #: a transaction with writes committed (a batch of reads only proves nothing)
    wrote: bool = False
    #: new tasks the database kept out (see ``CommitFuture.conflicts``)
    conflicts: dict[int, int | None] = field(default_factory=dict)
    #: a shared backend that skipped other servers' events (nobody here listened): the
    #: highest event id committed so far all the same
    committed_event_id: int = 0
