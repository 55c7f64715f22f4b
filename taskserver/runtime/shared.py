"""What the server's parts share: the store once started, the ready queue, the
counts per state and per queue (``counts.QueueCounts``), the unique keys held,
and the waiters for outcomes.

On SQLite the process keeps counts, unique keys and group heads in memory,
seeded from ``Backend.open``; the parts keep them exact as they append intents.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import ServerClosed
from ..storage import Store
from .counts import QueueCounts
from .history import History
from .ready import ReadyQueue
from .tally import Tally
from .waiting import Waiters
from .workers import WorkerPool


@dataclass(slots=True)
class UniqueKeys:
    """``unique_key -> id`` of the tasks that have not ended, both ways, and the commit
    of each keyed task until it is durable (a caller told ``existing`` awaits it)."""

    by_key: dict[str, int] = field(default_factory=dict)
    by_id: dict[int, str] = field(default_factory=dict)
    commits: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    #: look-ups that await the disk (``unique_for``) and their appends take turns
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: keys freed so far: a look-up that saw it move knows a task ended meanwhile
    released: int = 0

    def restore(self, keys: dict[str, int]) -> None:
        """Start from the keys the backend found (``Opened.unique_keys``)."""
        self.by_key = dict(keys)
        self.by_id = {task_id: key for key, task_id in keys.items()}

    def hold(self, key: str, task_id: int) -> None:
        """``task_id`` holds ``key`` until it ends."""
        self.by_key[key] = task_id
        self.by_id[task_id] = key

    def release(self, task_id: int) -> None:
        """The task ended: its key is free (unless another task took it meanwhile)."""
        key = self.by_id.pop(task_id, None)
        if key is not None and self.by_key.get(key) == task_id:
            del self.by_key[key]
            self.released += 1


@dataclass(slots=True)
class Shared:
    """The state the enqueue, outcome and maintenance parts work on together."""

    settings: Settings
    clock: Callable[[], float]
    waiters: Waiters
    counts: QueueCounts = field(default_factory=QueueCounts)
    unique: UniqueKeys = field(default_factory=UniqueKeys)
    #: what ``/metrics`` shows: counters, histograms, queue depths (``tally.py``)
    tally: Tally = field(default_factory=Tally)
    #: set when a delayed task may have become due sooner than the due loop thinks
    due_wake: asyncio.Event = field(default_factory=asyncio.Event)
    pool: WorkerPool | None = None
    started: bool = False
    closing: bool = False
    opened_store: Store | None = None
    #: the prefix of every task's topic (``topic(id)``)
    topic_prefix: str = ""
    #: a shared database's servers and what each reported (refreshed by the lease loop)
    nodes: list[dict[str, object]] = field(default_factory=list)
    #: set right after construction (its callbacks read from the store through us)
    ready: ReadyQueue = field(init=False)
    #: the last hour, per minute, for the dashboard's charts
    history: History = field(init=False)

    def __post_init__(self) -> None:
        self.history = History(self.clock)

    @property
    def store(self) -> Store:
        """The store; ``ServerClosed`` when the server is not running."""
        if self.opened_store is None:
            raise ServerClosed("the task server is not running")
        return self.opened_store

    def topic(self, task_id: int) -> str:
        """The topic (an IRI) on which a task's events are published."""
        return f"{self.topic_prefix}{task_id}"

    def is_running(self, task_id: int) -> bool:
        """True while a worker runs the task (its ``running`` row may not be committed yet)."""
        return self.pool is not None and self.pool.is_running(task_id)
