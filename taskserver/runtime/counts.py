"""Task counts kept where they change: per state, and per queue and state while active.

``GET /stats`` (and the dashboard, which fetches it on events) reads these, so it
costs O(queues), not a scan of every active row.

On SQLite one process owns the file: ``QueueCounts`` lives in memory, seeded once
from ``Backend.open`` (``Opened.counts`` and ``Opened.active_by_queue``, after
recovery) and kept exact by the server's parts as they append intents
(``Enqueue``, ``Outcomes``, ``Control``, ``Maintenance``). On a database several
servers share, the cluster's counts live in the database instead:
``SharedQueueCounts`` keeps the same methods, its totals refreshed by the
cluster loop, and answers ``active_by_queue`` (the one place ``/stats`` reads
per-queue counts through) from the database.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..lifecycle import ACTIVE, TERMINAL
from ..models import TaskState


class QueueCounts:
    """Tasks in each state, and active tasks (``lifecycle.ACTIVE``) per queue and state.

    ``totals`` is read on the enqueue hot path (``max_queued``): a plain dict, every
    state present. Change counts only through ``add``, ``move`` and ``purged``, so
    that the per-queue counts agree with the totals. A queue with no active task
    left is dropped (memory grows with the queues that have work, not with every
    name ever used).
    """

    __slots__ = ("_queues", "totals")

    def __init__(self) -> None:
        self.totals: dict[TaskState, int] = dict.fromkeys(TaskState, 0)
        self._queues: dict[str, dict[TaskState, int]] = {}

    def __repr__(self) -> str:
        active = sum(self.totals[state] for state in ACTIVE)
        return f"<QueueCounts active={active} queues={len(self._queues)}>"

    def seed(
        self, totals: dict[TaskState, int], active_by_queue: dict[str, dict[TaskState, int]]
    ) -> None:
        """Start from what the backend found at open (every count replaced)."""
        self.totals = dict.fromkeys(TaskState, 0)
        self.totals.update(totals)
        self._queues = {}
        for queue, states in active_by_queue.items():
            for state, n in states.items():
                if state in ACTIVE and n:
                    self._queue(queue)[state] = n

    def refresh(self, totals: dict[TaskState, int]) -> None:
        """Replace the per-state totals (a shared database's, counted there)."""
        self.totals = dict.fromkeys(TaskState, 0)
        self.totals.update(totals)

    def __getitem__(self, state: TaskState) -> int:
        """Tasks in ``state`` (all queues)."""
        return self.totals[state]

    def add(self, queue: str, state: TaskState, n: int = 1) -> None:
        """``n`` tasks of ``queue`` appeared in ``state`` (negative: were never stored)."""
        self.totals[state] += n
        if state in ACTIVE:
            self._change(queue, state, n)

    def move(self, queue: str, old: TaskState, new: TaskState) -> None:
        """One task of ``queue`` moved from ``old`` to ``new``."""
        totals = self.totals
        totals[old] -= 1
        totals[new] += 1
        # Twice a task (started, ended): ``_change`` inlined, the queue looked up once.
        was, now = old in ACTIVE, new in ACTIVE
        if not (was or now):
            return
        queues = self._queues
        states = queues.get(queue)
        if states is None:
            states = queues[queue] = {}
        if now:
            states[new] = states.get(new, 0) + 1
        if was:
            left = states.get(old, 0) - 1
            if left:
                states[old] = left
            else:
                del states[old]
                if not states:
                    del queues[queue]

    def purged(self, state: TaskState, n: int) -> None:
        """``n`` ended tasks in ``state`` were deleted (ended tasks are counted per state only)."""
        if state not in TERMINAL:
            raise ValueError(f"only ended tasks are purged, not {state.value}")
        self.totals[state] -= n

    async def active_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """Active tasks per queue and state: queues with at least one, states with none left
        out (what ``Backend.count_by_queue`` answers from the rows). A copy."""
        return {queue: dict(states) for queue, states in self._queues.items()}

    def _queue(self, queue: str) -> dict[TaskState, int]:
        states = self._queues.get(queue)
        if states is None:
            states = self._queues[queue] = {}
        return states

    def _change(self, queue: str, state: TaskState, n: int) -> None:
        states = self._queue(queue)
        left = states.get(state, 0) + n
        if left:
            states[state] = left
            return
        del states[state]
        if not states:
            del self._queues[queue]


class SharedQueueCounts(QueueCounts):
    """The counts of a database several servers share: per queue read from it on each
    call (``read``: ``Store.count_by_queue``), totals as the cluster loop last refreshed
    them, moved meanwhile by what this server appends."""

    __slots__ = ("_read",)

    def __init__(self, read: Callable[[], Awaitable[dict[str, dict[TaskState, int]]]]) -> None:
        super().__init__()
        self._read = read

    async def active_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """Active tasks per queue and state, over every server (from the database)."""
        return {
            queue: {state: n for state, n in states.items() if n}
            for queue, states in (await self._read()).items()
        }
