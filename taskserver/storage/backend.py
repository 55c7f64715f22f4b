"""The storage contract: what a backend does, named after what happens to tasks.

The group-commit engine (``engine.py``) is the only caller. It batches every
write from the loop and hands whole batches to ``apply``, one at a time, in
order; it never sees SQL. A backend owns its query language, its driver, its
connections and threads, and whatever it keeps to be fast (the SQLite backend
counts ids in memory because one process owns the file; a PostgreSQL backend
takes them from sequences). ``tests/test_storage_contract.py`` runs the same
cases against every backend: adding one is one fixture parameter.

Orders every backend keeps:

* **Commit order is id order.** Events of one batch get ids above those of every
  earlier batch; once an event id is visible to ``events_after``, no smaller one
  appears later (``Last-Event-ID`` replay relies on it). A failed batch leaves
  gaps, never duplicates.
* **A batch is one transaction**: all of its writes or none.
* **Reads that ride in a batch** (``Batch.reads``) see exactly that batch's
  commit and nothing later.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..models import Event, Task, TaskState
from .intents import Applied, Batch, Signals


@dataclass(slots=True)
class Opened:
    """What ``Backend.open`` found, all the server needs at start, in one answer."""

    #: tasks in each state (every state present, zeros included)
    counts: dict[TaskState, int]
    #: ``unique_key -> id`` of every task that has not ended
    unique_keys: dict[str, int]
    #: per serial group with tasks waiting on disk: ``(group, oldest id, its state)``
    group_heads: list[tuple[str, int, TaskState]]
    #: queues with queued tasks on disk
    queues_with_work: list[str]
    #: queued tasks per queue and whole second of ``available_at``: ``(queue, second, n)``
    #: (``/metrics``: queue depth and oldest age; empty if the backend does not say)
    queued_seconds: list[tuple[str, int, int]] = field(default_factory=list)
    #: what recovery did with tasks a dead process left running
    recovered_queued: int = 0
    recovered_failed: int = 0
    #: the highest event id committed (a stream starting now replays nothing below it)
    committed_event_id: int = 0
    #: names of the queues a ``QueuePause`` left paused, sorted: they start no task
    paused_queues: list[str] = field(default_factory=list)
    #: tasks that have not ended, per queue and state (``count_by_queue``): the seed of
    #: the server's in-memory per-queue counts; a backend whose servers share the
    #: counts in the database may leave it empty
    active_by_queue: dict[str, dict[TaskState, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(Protocol):
    """One database behind the engine. Methods not marked *loop* run as the backend
    likes (a thread, a connection pool); none may block the event loop.

    A backend is ``shared`` when several servers use its database at once
    (PostgreSQL). Then what one process keeps in memory on SQLite comes from the
    database: ``PageQueued`` *claims* the tasks it returns for this server (the
    attempt counted, see ``storage/postgres/claims.py``), ``DueTasks`` promotes
    the due tasks itself (with their events), ``GroupHead`` only reads, row
    writes of tasks another server holds change nothing, unique keys and periodic
    runs another server holds keep new tasks out (``Applied.conflicts``), and
    ``Durable.events`` carries the other servers' events too, in id order.
    """

    #: several servers share the database (see above)
    shared: bool

    async def open(self) -> Opened:
        """Connect, migrate the schema (refusing a newer one), then recover, atomically:
        every task a dead process left ``running`` (or whose start the backend recorded,
        see ``started``) goes back to ``queued`` with the attempt counted, or to
        ``failed`` when that attempt was its last (``lifecycle.recovered_state``),
        each with its event. Returns the state the server starts from."""
        ...

    async def close(self) -> None:
        """Close connections and threads. The engine has applied every batch before."""
        ...

    def bind(self, signals: Signals) -> None:
        """*Loop.* Where a shared backend sends what the other servers say (``Signals``);
        given before ``open``."""
        ...

    def request_cancel(self, task_id: int) -> Awaitable[None]:
        """Tell every server sharing the database to cancel ``task_id`` if it runs it."""
        ...

    async def paused_queues(self) -> list[str]:
        """Names of the paused queues (``QueuePause``), sorted."""
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """The servers sharing the database and what each reported (``Lease``)."""
        ...

    # --- ids and rows, on the loop, per task: keep them cheap ---------------------

    def next_task_id(self) -> int:
        """*Loop.* A new task id, above every id this process used (purged ones
        included); on a shared backend, unique among every server's."""
        ...

    def next_event_id(self) -> int:
        """*Loop.* A new event id, above every id handed out before (see the module's
        orders: ids of a later batch are higher)."""
        ...

    @property
    def last_event_id(self) -> int:
        """*Loop.* The highest event id handed out so far (committed or about to be)."""
        ...

    def encode_new(self, task: Task, data_text: str) -> Any:
        """*Loop.* The row ``apply`` inserts for a new task (``data_text``: its data's JSON)."""
        ...

    def encode_update(self, task: Task, result_text: str | None) -> Any:
        """*Loop.* The row ``apply`` writes for ``task``'s whole mutable state."""
        ...

    def started(self, task_id: int, attempt: int, event_id: int) -> int | None:
        """*Loop.* Record at once, surviving ``kill -9``, that ``attempt`` of a task started
        (its ``started`` event has ``event_id`` and is not committed yet), so ``open``
        counts it. Returns a token for ``release`` once a batch holding that event
        committed, or ``None``. A backend whose claims commit the attempt does nothing."""
        ...

    def release(self, token: int) -> None:
        """*Loop.* Every start recorded under ``token`` is committed: forget them."""
        ...

    # --- the one write -----------------------------------------------------------

    async def apply(self, batch: Batch) -> Applied:
        """Write ``batch`` in one transaction, then answer its reads; raise and change
        nothing if it cannot commit.

        Within the transaction, in order: the new rows, the row updates, the
        schedule runs, the conditional ``moves`` (each decided on the state it
        finds, with its event if it moved), the chores (``Purge``, ``TrimEvents``,
        ``ProbeWrite``, ``QueuePause``: a paused queue's name kept until it is
        resumed, read back by ``open`` as ``Opened.paused_queues``), then every
        event in id order. ``Applied.durable.events`` is every stored event in id order;
        ``moved``, ``counts`` and ``pages`` answer ``moves``, ``chores`` and
        ``reads`` one for one. A batch with no writes needs no transaction.
        """
        ...

    # --- reads of committed state, oldest first unless said ----------------------

    async def get_task(self, task_id: int) -> Task | None:
        """The committed state of one task, or ``None``."""
        ...

    async def list_tasks(
        self,
        *,
        state: TaskState | None,
        after: int,
        limit: int,
        before: int | None = None,
        queue: str | None = None,
        name: str | None = None,
        unique_key: str | None = None,
    ) -> list[Task]:
        """Up to ``limit`` tasks: ids above ``after`` in id order, or, with ``before``,
        ids below it newest first; only those in ``state``, of ``queue``, with
        ``name`` and with ``unique_key`` when given (each an exact match, all of them
        together)."""
        ...

    async def ids_in_state(self, state: TaskState, limit: int) -> list[int]:
        """Up to ``limit`` ids of tasks in ``state``, oldest first."""
        ...

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        """Up to ``limit`` events with ids above ``after_id``, in id order; ``task_id``
        keeps one task's, ``tasks_only`` drops published updates."""
        ...

    async def find_event(self, uid: str) -> int | None:
        """The id of the first event with publisher id ``uid``, or ``None``."""
        ...

    async def count_by_state(self) -> dict[TaskState, int]:
        """Tasks in each state (every state present)."""
        ...

    async def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """Tasks that have not ended, per queue and state."""
        ...

    async def next_due(self) -> float | None:
        """The earliest ``available_at`` of a waiting or retrying task, or ``None``."""
        ...

    async def recent_unique(self, key: str, since: float) -> int | None:
        """The newest task with ``key`` that succeeded at or after ``since``."""
        ...

    async def schedules(self) -> dict[str, float]:
        """``name -> last due time enqueued`` of every periodic schedule."""
        ...
