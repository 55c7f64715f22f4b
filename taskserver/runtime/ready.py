"""The bounded in-memory ready queue: queues, priorities and serial groups.

Each named queue holds a *window* of at most ``capacity`` queued tasks, ordered
by task priority (higher first), then id (FIFO). Everything else that is queued
waits on disk, in the store: a task offered to a full window is refused and the
queue notes a backlog; when the window drains below half, it asks (through
``page_in``, handed to it) for the first tasks of that queue in run order and
takes the ones it does not hold. A backlog of millions costs disk, not memory,
and a long import in one queue never fills another queue's window.

A worker takes the best task of the highest-priority queue that has one and is
under its concurrency limit. Tasks of a *serial group* run one at a time, in run
order: the group's owner (the first of its tasks taken in) holds it until it
ends (``release``); the others wait on disk, outside the window, and the next
one is paged in when the group is released.

Due times are not kept here: delayed and retrying tasks wait on disk and are
offered when due. The queue never touches the store itself.

**Claiming** (a database shared by several servers, ``claiming=True``): a task is
this server's to run only once a page *claimed* it in the database, which also
decides serial groups' turns and counts queue concurrency over every server. So
``offer`` takes nothing in: it notes that the queue has work and asks for a page
at once; a page is taken in whole (every task in it was claimed for us); the
``capacity`` is the number of workers: a page claims for the idle ones, and
``prefetch`` more while tasks are short (their recent average run under
``SHORT_TASK``): a claim costs a commit, which short tasks would wait on, while a
long task claimed ahead would wait here when another server could run it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .. import lifecycle
from ..models import Task, TaskState

#: Seconds: tasks whose recent average run is shorter are claimed ahead (``prefetch``).
SHORT_TASK = 0.05


@dataclass(slots=True)
class _Queue:
    name: str
    priority: int = 0
    concurrency: int | None = None
    #: (-priority, id, push number, task): the push number is unique, so the heap never
    #: compares two Tasks, even when a task left behind by a cancel is pushed again
    heap: list[tuple[int, int, int, Task]] = field(default_factory=list)
    #: every task of this queue in memory: eligible or held by its serial group
    present: dict[int, Task] = field(default_factory=dict)
    running: int = 0
    backlog: bool = False
    paging: bool = False
    requested: int = 0
    #: ids taken by workers while a page was being read
    taken: set[int] = field(default_factory=set)
    #: set up by configure(); an undeclared queue is dropped when idle
    declared: bool = False
    #: a paused queue keeps its window but hands out no task (``pause``)
    paused: bool = False

    def has_room_to_run(self) -> bool:
        return self.concurrency is None or self.running < self.concurrency


class ReadyQueue:
    """Ready tasks by queue, with removal by id and paging from disk.

    ``page_in(queue, limit, busy_groups)`` must eventually call ``deliver(queue, tasks)``
    once, with the queue's first queued tasks in run order: of each serial group
    only its oldest task that has not ended, and none of the ``busy_groups``.
    ``group_head(group)`` must eventually call ``deliver_head(group, task or None)``
    with the group's oldest task that has not ended.
    ``skip(task_id)`` tells ``deliver``/``offer`` a task is already held by a worker.
    """

    def __init__(
        self,
        capacity: int,
        page_in: Callable[[str, int, list[str]], None],
        group_head: Callable[[str], None],
        skip: Callable[[int], bool] = lambda task_id: False,
        *,
        claiming: bool = False,
        prefetch: int = 0,
    ) -> None:
        self.capacity = capacity
        #: tasks are claimed from a shared database (see the module docstring)
        self.claiming = claiming
        #: tasks claimed beyond the idle workers while tasks are short
        self.prefetch = prefetch
        #: claiming: recent average run (s) of the tasks taken, and when each was taken
        self.run_average = math.inf
        self._taken_at: dict[int, float] = {}
        self._page_in = page_in
        self._group_head = group_head
        self._skip = skip
        self._queues: dict[str, _Queue] = {}
        self._order: list[_Queue] = []
        self._getters: list[asyncio.Future[None]] = []
        self._tombstones: set[int] = set()
        self._owner: dict[str, int] = {}  # serial group -> the task holding it
        self._owned: dict[int, str] = {}  # and back
        #: serial groups with tasks waiting on disk behind the owner
        self._group_backlog: set[str] = set()
        self._fetching: set[str] = set()
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return sum(len(q.present) for q in self._order)

    def __contains__(self, task_id: int) -> bool:
        return any(task_id in q.present for q in self._order)

    def __repr__(self) -> str:
        backlog = [q.name for q in self._order if q.backlog]
        flags = f" backlog={','.join(backlog)}" if backlog else ""
        return (
            f"<ReadyQueue {len(self)} in {len(self._order)} queues{flags} "
            f"idle_workers={len(self._getters)}>"
        )

    # --- queues ------------------------------------------------------------------

    def configure(self, name: str, *, priority: int = 0, concurrency: int | None = None) -> None:
        """Set a queue's priority (higher runs first) and concurrency limit (None: none)."""
        queue = self._queue(name)
        queue.priority, queue.concurrency = priority, concurrency
        queue.declared = True
        self._order.sort(key=lambda q: -q.priority)

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name)
            self._order.append(queue)
            self._order.sort(key=lambda q: -q.priority)
        return queue

    def snapshot(self) -> dict[str, dict[str, int | bool | None]]:
        """Per queue: tasks in memory, running, limit, priority, paused and backlog flag."""
        return {
            q.name: {
                "in_memory": len(q.present),
                "running": q.running,
                "concurrency": q.concurrency,
                "priority": q.priority,
                "paused": q.paused,
                "backlog_on_disk": q.backlog,
            }
            for q in self._order
        }

    def limit_of(self, name: str) -> int | None:
        """Queue ``name``'s concurrency limit (``None``: none)."""
        queue = self._queues.get(name)
        return None if queue is None else queue.concurrency

    def pause(self, name: str) -> None:
        """Hand out no task of queue ``name`` until ``resume``; it still takes tasks in.

        Tasks already running go on; a paused queue is kept while idle."""
        self._queue(name).paused = True

    def resume(self, name: str) -> None:
        """Undo ``pause``: wake a worker per task the queue holds."""
        queue = self._queues.get(name)
        if queue is None or not queue.paused:
            return
        queue.paused = False
        for _ in range(min(len(queue.heap), len(self._getters))):
            self._wake_one()
        if self.claiming:
            self._maybe_page(queue, eager=True)

    def paused(self) -> list[str]:
        """Names of the paused queues, sorted."""
        return sorted(q.name for q in self._order if q.paused)

    @property
    def has_backlog(self) -> bool:
        """True when queued tasks may be waiting on disk, outside a window."""
        return any(q.backlog for q in self._order)

    # --- in ----------------------------------------------------------------------------

    def offer(self, task: Task) -> bool:
        """Take a queued ``task`` in if its queue's window has room and nothing waits on disk.

        Returns ``False`` when refused; the task then stays queued on disk and a
        later page brings it in (for a task whose serial group is busy: once the
        group is released).
        """
        queue = self._queue(task.queue)
        if self.claiming:
            # Ours to run only once claimed: note the work and claim at once.
            queue.backlog = True
            self._maybe_page(queue)
            return False
        if task.id in queue.present or task.id in self._tombstones or self._skip(task.id):
            return True
        group = task.serial_group
        if group is not None and self._owner.get(group) == task.id:
            # The group's owner back from a retry or a wait: pages leave busy groups
            # out, so it must come in now, window or not (one per group at most).
            return self._admit(queue, task)
        if queue.backlog or len(queue.present) >= self.capacity:
            queue.backlog = True
            if group is not None:
                self._group_backlog.add(group)
            self._maybe_page(queue)
            return False
        return self._admit(queue, task)

    def start_from_disk(self, queues: Iterable[str]) -> None:
        """Mark that queued tasks of ``queues`` wait on disk (a restart) and page them in."""
        for name in queues:
            queue = self._queue(name)
            queue.backlog = True
            self._maybe_page(queue)

    def deliver(self, name: str, tasks: list[Task]) -> None:
        """Take in a page answered by ``page_in`` for queue ``name``, in run order."""
        queue = self._queue(name)
        queue.paging = False
        if self.claiming:
            # Every task of the page was claimed for this server: all of them run here.
            queue.taken = set()
            for task in tasks:
                self._admit_claimed(queue, task)
            if len(tasks) < queue.requested:
                queue.backlog = False
            self._maybe_page(queue)
            return
        # Tasks taken (and maybe finished) by a worker while the page was read are
        # still "queued" in it: never take those in again.
        taken, queue.taken = queue.taken, set()
        for task in tasks:
            if len(queue.present) >= self.capacity:
                break
            if (
                task.id in queue.present
                or task.id in taken
                or task.id in self._tombstones
                or self._skip(task.id)
            ):
                continue
            # A page holds only the oldest task of each free group (see page_in): it
            # may take its group even when the group is known to wait on disk.
            self._admit(queue, task, head=True)
        else:
            if len(tasks) < queue.requested:
                queue.backlog = False
        self._maybe_page(queue)

    def _admit(self, queue: _Queue, task: Task, *, head: bool = False) -> bool:
        group = task.serial_group
        if group is not None:
            owner = self._owner.get(group)
            busy = owner is not None and owner != task.id
            if busy or (not head and owner is None and group in self._group_backlog):
                # Older tasks of its group come first: it waits on disk, outside the
                # window (a long group never crowds out other tasks), and the group's
                # head is fetched when the group is free.
                self._group_backlog.add(group)
                if not busy:
                    self._fetch_head(group)
                return False
            self._own(group, task.id)
        queue.present[task.id] = task
        heapq.heappush(queue.heap, (-task.priority, task.id, next(self._pushes), task))
        self._wake_one()
        return True

    def _admit_claimed(self, queue: _Queue, task: Task) -> None:
        if task.serial_group is not None:  # the database gave the group's turn to it
            self._own(task.serial_group, task.id)
        queue.present[task.id] = task
        heapq.heappush(queue.heap, (-task.priority, task.id, next(self._pushes), task))
        self._wake_one()

    def _maybe_page(self, queue: _Queue, *, eager: bool = False) -> None:
        if self.claiming and queue.paused:
            return  # a claim would start its tasks: a paused queue claims none
        if self.claiming:
            # Claim for idle workers (and the prefetch, in ``capacity``): a claimed task
            # counts as running in the cluster, so few wait here that another could run.
            ahead = self.prefetch if self.run_average < SHORT_TASK else 0
            room = self.capacity + ahead - sum(len(q.present) + q.running for q in self._order)
        else:
            room = self.capacity - len(queue.present)
        if (
            queue.backlog
            and not queue.paging
            and room >= (1 if eager or self.claiming else max(1, self.capacity // 2))
        ):
            queue.paging = True
            # Ask for enough to find `room` tasks we do not hold yet (a claim finds
            # only tasks nobody holds).
            queue.requested = room if self.claiming else room + len(queue.present)
            self._page_in(queue.name, queue.requested, list(self._owner))

    # --- serial groups -----------------------------------------------------------

    def claim(self, task: Task) -> None:
        """A new task of a serial group was just stored: the first one of a free group
        holds it from now on (delayed or not), so later ones wait behind it."""
        group = task.serial_group
        if group is None or group in self._owner or self.claiming:
            return
        if group in self._group_backlog:
            self._fetch_head(group)  # older tasks of it wait on disk: they come first
            return
        self._own(group, task.id)

    def restore_group(self, group: str, head: int, state: TaskState) -> None:
        """At start: ``group`` has tasks on disk, the oldest being ``head`` in ``state``.

        A delayed or retrying head holds the group until it runs; a queued one is
        paged in as the group's next task. Either way, a new task of the group
        waits behind the ones on disk.
        """
        if self.claiming:
            return  # the database decides the group's turn
        if state is lifecycle.QUEUED:
            self._group_backlog.add(group)
        else:
            self.set_owner(group, head)

    def set_owner(self, group: str, task_id: int) -> None:
        """Record that ``task_id`` holds ``group`` while it waits on disk (after a restart)."""
        if group not in self._owner:
            self._own(group, task_id)

    def _own(self, group: str, task_id: int) -> None:
        self._owner[group] = task_id
        self._owned[task_id] = group

    def release(self, task_id: int) -> None:
        """``task_id`` has ended: if it held a serial group, fetch the group's next task."""
        group = self._owned.pop(task_id, None)
        if group is None:
            return
        if self._owner.get(group) == task_id:
            del self._owner[group]
        # Always ask: after a restart, or past a busy page, tasks of the group may
        # wait on disk without this queue having seen them.
        self._fetch_head(group)

    def _fetch_head(self, group: str) -> None:
        if group not in self._fetching:
            self._fetching.add(group)
            self._group_head(group)

    def deliver_head(self, group: str, task: Task | None) -> None:
        """Take in the oldest task of ``group`` that has not ended (answer to ``group_head``)."""
        self._fetching.discard(group)
        if self.claiming:
            if task is not None and task.state is lifecycle.QUEUED:
                self.start_from_disk([task.queue])  # its turn: claim it from its queue
            return
        if task is None:
            self._group_backlog.discard(group)  # the group is empty
            return
        owner = self._owner.get(group)
        if owner is not None and owner != task.id:
            return  # taken meanwhile; its release fetches again
        if task.state is not lifecycle.QUEUED:
            self.set_owner(group, task.id)  # delayed: it holds the group until it runs
            return
        queue = self._queue(task.queue)
        if task.id in queue.present or task.id in self._tombstones or self._skip(task.id):
            return
        # One task per group may exceed the window: the bound is the number of groups.
        self._admit(queue, task, head=True)

    # --- out -----------------------------------------------------------------------

    def remove(self, task_id: int) -> Task | None:
        """Take a waiting task out of memory; ``None`` if it is not there."""
        for queue in self._order:
            task = queue.present.pop(task_id, None)
            if task is not None:
                self._maybe_page(queue)
                return task
        return None

    def drain(self) -> list[Task]:
        """Take every waiting task out of memory (claimed ones go back at a stop)."""
        tasks = [task for queue in self._order for task in queue.present.values()]
        for queue in self._order:
            queue.present.clear()
            queue.heap.clear()
        return tasks

    def tombstone(self, task_id: int) -> None:
        """Keep ``task_id`` out of what is offered or delivered until ``untombstone``."""
        self._tombstones.add(task_id)

    def untombstone(self, task_id: int) -> None:
        """Undo ``tombstone``."""
        self._tombstones.discard(task_id)

    def get_nowait(self) -> Task | None:
        """The best eligible task (counted as running in its queue), or ``None``."""
        for queue in self._order:
            if queue.paused or not queue.has_room_to_run():
                continue
            heap = queue.heap
            while heap:
                _, task_id, _, task = heapq.heappop(heap)
                if queue.present.get(task_id) is not task:
                    # Removed (cancelled) while it waited, maybe back since (a retry)
                    # under a newer entry: only the entry of the task held now counts.
                    continue
                del queue.present[task_id]
                if self.claiming:
                    self._taken_at[task_id] = time.monotonic()
                if queue.paging:
                    queue.taken.add(task_id)
                queue.running += 1
                self._maybe_page(queue)
                return task
        return None

    def done(self, task: Task) -> None:
        """A worker is finished with ``task`` (whatever the outcome): free its slot."""
        queue = self._queue(task.queue)
        queue.running = max(0, queue.running - 1)
        if self.claiming:  # a worker is free: claim for it
            if queue.concurrency is not None:
                # A slot of a limited queue is free: tasks may wait for it there even
                # though the last claim found none (the queue was full then).
                queue.backlog = True
            taken = self._taken_at.pop(task.id, None)
            if taken is not None:
                ran = time.monotonic() - taken
                previous = self.run_average
                self.run_average = ran if previous == math.inf else 0.8 * previous + 0.2 * ran
            for other in self._order:
                self._maybe_page(other)
        if queue.heap and not queue.paused:
            self._wake_one()
        elif (
            not queue.declared
            and not queue.paused
            and not queue.present
            and not queue.running
            and not queue.backlog
            and not queue.paging
        ):
            # Callers may name any queue: one they did not declare is forgotten once
            # idle, so memory and the dispatch loop do not grow with every name used.
            del self._queues[queue.name]
            self._order.remove(queue)

    async def get(self) -> Task:
        """Wait for and take the best eligible task. Cancel-safe: a cancelled wait takes none."""
        while True:
            task = self.get_nowait()
            if task is not None:
                return task
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter in self._getters:
                    self._getters.remove(getter)
                elif getter.done() and not getter.cancelled():
                    self._wake_one()  # pass the wake-up on, or a task could wait forever
                raise

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return
