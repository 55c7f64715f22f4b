"""``Tally``: what the server counts as tasks come and go, for ``/metrics``.

The parts that already see each transition call it (``Enqueue``, ``Outcomes``,
``Control``, ``Maintenance``), with the ``Task`` in hand; each call is a few dict
operations on the loop, no lock and no store read. The contract:

* Counters by queue and name: tasks enqueued (once their batch committed), tasks
  finished by outcome (``succeeded``, ``failed``, ``cancelled``), retries scheduled.
* Histograms by queue: each attempt's run time (start to its outcome) and queue
  wait (``available_at`` to start: a delayed or retried task waits from its due time).
* Per queue, the queued tasks (in memory and on disk) and the oldest one's
  ``available_at``, to the second: counts per second of ``available_at`` plus a heap
  of those seconds, so the oldest is found in O(1) amortised, never by a scan.
  Seeded at start from ``Opened.queued_seconds``. On a database several servers share
  (``untracked_depths``) others enqueue and claim too: nothing is kept, and ``/metrics``
  asks the store for the depths at scrape time instead.
* Label sets are bounded: past ``MAX_SERIES`` distinct ``(queue, name)`` pairs (or
  queues) new ones are counted under ``OTHER``, so a caller naming a fresh queue per
  task cannot grow memory or the scrape without end.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

from ..lifecycle import RETRYING, TERMINAL
from ..measure import SECONDS, Histogram
from ..models import Task, TaskState

#: Distinct label sets kept per metric before new ones are folded into ``OTHER``.
MAX_SERIES = 1000
#: The queue and name label of what did not fit under ``MAX_SERIES``.
OTHER = "_other"


@dataclass(slots=True)
class Depth:
    """One queue's queued tasks: how many, and how many per second of ``available_at``."""

    count: int = 0
    seconds: dict[float, int] = field(default_factory=dict)
    #: every second in ``seconds``, and some that left it (dropped lazily at the top)
    heap: list[float] = field(default_factory=list)

    def add(self, second: float, n: int = 1) -> None:
        self.count += n
        held = self.seconds.get(second)
        if held is not None:
            self.seconds[second] = held + n
            return
        self.seconds[second] = n
        if len(self.heap) > 2 * len(self.seconds) + 64:
            self.heap = sorted(self.seconds)  # a sorted list is a heap: drop stale seconds
        else:
            heapq.heappush(self.heap, second)

    def remove(self, second: float) -> None:
        held = self.seconds.get(second)
        if held is None:
            return  # never counted (a task queued before a process that did not seed it)
        self.count -= 1
        if held > 1:
            self.seconds[second] = held - 1
        else:
            del self.seconds[second]

    def oldest(self) -> float | None:
        """The earliest second of ``available_at`` among the queued tasks, or ``None``."""
        heap, seconds = self.heap, self.seconds
        while heap and heap[0] not in seconds:
            heapq.heappop(heap)
        return heap[0] if heap else None


def _ignore(task: Task) -> None:
    return None


class Tally:
    """The counters, histograms and queue depths behind ``/metrics``.

    Keys hold ``task.name`` as it is (``None`` for none) and the ``TaskState`` itself:
    the scrape spells them out, the hot path does not.
    """

    def __init__(self) -> None:
        self.enqueued: dict[tuple[str, str | None], int] = {}
        self.finished: dict[tuple[str, str | None, TaskState], int] = {}
        self.retries: dict[tuple[str, str | None], int] = {}
        self.run_seconds: dict[str, Histogram] = {}
        self.wait_seconds: dict[str, Histogram] = {}
        self.depths: dict[str, Depth] = {}

    def __repr__(self) -> str:
        queued = sum(d.count for d in self.depths.values())
        return f"<Tally queues={len(self.depths)} queued={queued}>"

    # --- new label sets (the slow path: once per label set) -----------------------------

    @staticmethod
    def _count(table: dict[Any, int], key: Any, other: Any) -> None:
        if key not in table and len(table) >= MAX_SERIES:
            key = other
        table[key] = table.get(key, 0) + 1

    @staticmethod
    def _histogram(table: dict[str, Histogram], queue: str) -> Histogram:
        histogram = table.get(queue)
        if histogram is None:
            if len(table) >= MAX_SERIES:
                queue = OTHER
                histogram = table.get(queue)
            if histogram is None:
                histogram = table[queue] = Histogram(SECONDS)
        return histogram

    # --- what the parts report (each runs per task: kept to a few dict operations) ----

    def committed(self, tasks: list[Task]) -> None:
        """The batch of these new tasks committed: they are enqueued."""
        enqueued = self.enqueued
        for task in tasks:
            key = (task.queue, task.name)
            try:
                enqueued[key] += 1
            except KeyError:
                self._count(enqueued, key, (OTHER, OTHER))

    def queued(self, task: Task) -> None:
        """``task`` became ``queued`` (new, due, retried, re-queued)."""
        try:
            depth = self.depths[task.queue]
        except KeyError:
            name = task.queue if len(self.depths) < MAX_SERIES else OTHER
            depth = self.depths.setdefault(name, Depth())
        second = task.available_at // 1  # a float key: equal to the int, and cheaper
        seconds = depth.seconds
        if second in seconds:  # Depth.add, inlined: this runs per task
            depth.count += 1
            seconds[second] += 1
        else:
            depth.add(second)

    def unqueued(self, task: Task) -> None:
        """``task`` left ``queued`` (started, cancelled, or its batch failed)."""
        name = task.queue
        depth = self.depths.get(name)
        if depth is None:
            name, depth = OTHER, self.depths.get(OTHER)
            if depth is None:
                return
        depth.remove(task.available_at // 1)
        if not depth.count and not depth.seconds:
            del self.depths[name]  # queues come and go: keep those with tasks

    def started(self, task: Task) -> None:
        """A worker started ``task`` (``started_at`` set): it left the queue."""
        self.unqueued(task)
        wait = (task.started_at or task.available_at) - task.available_at
        try:
            histogram = self.wait_seconds[task.queue]
        except KeyError:
            histogram = self._histogram(self.wait_seconds, task.queue)
        if wait < 0.0:
            wait = 0.0
        histogram.counts[bisect_left(histogram.bounds, wait)] += 1  # observe(), inlined
        histogram.sum += wait

    def attempt_ended(self, task: Task, now: float) -> None:
        """An attempt of ``task`` ended: its outcome in ``task.state`` (an ended state, a
        retry or a wait); ``now`` is when."""
        run = now - (task.started_at or now)
        try:
            histogram = self.run_seconds[task.queue]
        except KeyError:
            histogram = self._histogram(self.run_seconds, task.queue)
        if run < 0.0:
            run = 0.0
        histogram.counts[bisect_left(histogram.bounds, run)] += 1  # observe(), inlined
        histogram.sum += run
        state = task.state
        if state is RETRYING:
            self._count(self.retries, (task.queue, task.name), (OTHER, OTHER))
        elif state in TERMINAL:
            self.ended(task)

    def ended(self, task: Task) -> None:
        """``task`` ended, its outcome in ``task.state``."""
        key = (task.queue, task.name, task.state)
        try:
            self.finished[key] += 1
        except KeyError:
            self._count(self.finished, key, (OTHER, OTHER, task.state))

    def untracked_depths(self) -> None:
        """Keep no queue depths (a shared database): ``queued`` and ``unqueued`` do nothing."""
        self.depths.clear()
        self.queued = self.unqueued = _ignore  # type: ignore[method-assign]

    def seed(self, queued_seconds: list[tuple[str, int, int]]) -> None:
        """At start: ``(queue, second of available_at, tasks)`` queued on disk."""
        for queue, second, n in queued_seconds:
            name = queue if queue in self.depths or len(self.depths) < MAX_SERIES else OTHER
            self.depths.setdefault(name, Depth()).add(second, n)
