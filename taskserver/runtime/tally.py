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
  Seeded at start from ``Opened.queued_seconds``. On a database several processes
  share, it counts what this process saw.
* Label sets are bounded: past ``MAX_SERIES`` distinct ``(queue, name)`` pairs (or
  queues) new ones are counted under ``OTHER``, so a caller naming a fresh queue per
  task cannot grow memory or the scrape without end.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from ..measure import SECONDS, Histogram
from ..models import Task

#: Distinct label sets kept per metric before new ones are folded into ``OTHER``.
MAX_SERIES = 1000
#: The queue and name label of what did not fit under ``MAX_SERIES``.
OTHER = "_other"


@dataclass(slots=True)
class Depth:
    """One queue's queued tasks: how many, and how many per second of ``available_at``."""

    count: int = 0
    seconds: dict[int, int] = field(default_factory=dict)
    #: every second in ``seconds``, and some that left it (dropped lazily at the top)
    heap: list[int] = field(default_factory=list)

    def add(self, second: int, n: int = 1) -> None:
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

    def remove(self, second: int) -> None:
        held = self.seconds.get(second)
        if held is None:
            return  # never counted (a task queued before a process that did not seed it)
        self.count -= 1
        if held > 1:
            self.seconds[second] = held - 1
        else:
            del self.seconds[second]

    def oldest(self) -> int | None:
        """The earliest second of ``available_at`` among the queued tasks, or ``None``."""
        heap, seconds = self.heap, self.seconds
        while heap and heap[0] not in seconds:
            heapq.heappop(heap)
        return heap[0] if heap else None


class Tally:
    """The counters, histograms and queue depths behind ``/metrics``."""

    def __init__(self) -> None:
        self.enqueued: dict[tuple[str, str], int] = {}
        self.finished: dict[tuple[str, str, str], int] = {}
        self.retries: dict[tuple[str, str], int] = {}
        self.run_seconds: dict[str, Histogram] = {}
        self.wait_seconds: dict[str, Histogram] = {}
        self.depths: dict[str, Depth] = {}

    def __repr__(self) -> str:
        queued = sum(d.count for d in self.depths.values())
        return f"<Tally queues={len(self.depths)} queued={queued}>"

    # --- labels -------------------------------------------------------------------

    def _labels(self, table: dict[tuple[str, str], int], task: Task) -> tuple[str, str]:
        key = (task.queue, task.name or "")
        if key in table or len(table) < MAX_SERIES:
            return key
        return (OTHER, OTHER)

    def _histogram(self, table: dict[str, Histogram], queue: str) -> Histogram:
        histogram = table.get(queue)
        if histogram is None:
            if len(table) >= MAX_SERIES:
                queue = OTHER
                histogram = table.get(queue)
            if histogram is None:
                histogram = table[queue] = Histogram(SECONDS)
        return histogram

    # --- what the parts report --------------------------------------------------------

    def committed(self, task: Task) -> None:
        """A new task's batch committed: it is enqueued."""
        key = self._labels(self.enqueued, task)
        self.enqueued[key] = self.enqueued.get(key, 0) + 1

    def queued(self, task: Task) -> None:
        """``task`` became ``queued`` (new, due, retried, re-queued)."""
        depth = self.depths.get(task.queue)
        if depth is None:
            name = task.queue if len(self.depths) < MAX_SERIES else OTHER
            depth = self.depths.setdefault(name, Depth())
        depth.add(int(task.available_at))

    def unqueued(self, task: Task) -> None:
        """``task`` left ``queued`` (started, cancelled, or its batch failed)."""
        name = task.queue if task.queue in self.depths else OTHER
        depth = self.depths.get(name)
        if depth is not None:
            depth.remove(int(task.available_at))
            if not depth.count and not depth.seconds:
                del self.depths[name]  # queues come and go: keep those with tasks

    def started(self, task: Task) -> None:
        """A worker started ``task`` (``started_at`` set): it left the queue."""
        self.unqueued(task)
        if task.started_at is not None:
            wait = max(0.0, task.started_at - task.available_at)
            self._histogram(self.wait_seconds, task.queue).observe(wait)

    def attempt_ended(self, task: Task, now: float) -> None:
        """An attempt of ``task`` ended (any outcome, a retry or a wait included)."""
        if task.started_at is not None:
            run = max(0.0, now - task.started_at)
            self._histogram(self.run_seconds, task.queue).observe(run)

    def retried(self, task: Task) -> None:
        """A failed attempt of ``task`` will be retried."""
        key = self._labels(self.retries, task)
        self.retries[key] = self.retries.get(key, 0) + 1

    def ended(self, task: Task) -> None:
        """``task`` ended, its outcome in ``task.state``."""
        queue, name = task.queue, task.name or ""
        key = (queue, name, task.state.value)
        if key not in self.finished and len(self.finished) >= MAX_SERIES:
            key = (OTHER, OTHER, task.state.value)
        self.finished[key] = self.finished.get(key, 0) + 1

    def seed(self, queued_seconds: list[tuple[str, int, int]]) -> None:
        """At start: ``(queue, second of available_at, tasks)`` queued on disk."""
        for queue, second, n in queued_seconds:
            name = queue if queue in self.depths or len(self.depths) < MAX_SERIES else OTHER
            self.depths.setdefault(name, Depth()).add(second, n)
