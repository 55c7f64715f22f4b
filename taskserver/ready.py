"""The bounded in-memory ready queue.

It holds a *window* of at most ``capacity`` queued tasks, in id order (FIFO).
Everything else that is queued waits on disk, in the store: when a task is
offered to a full window, the queue notes that a backlog exists and refuses it;
when the window drains below half, it asks (through ``page_in``, handed to it)
for the next page of queued tasks with ids above the last one it has seen. So a
backlog of millions costs disk, not memory, and order is kept.

The queue never touches the store itself: ``page_in(after_id, limit)`` is a
function the server hands it, and the answer comes back through ``deliver``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .models import Task


class ReadyQueue:
    """FIFO of ready tasks with removal by id and paging from disk.

    ``page_in(after_id, limit)`` must eventually call ``deliver`` exactly once.
    ``skip(task_id)`` tells ``deliver`` a task is already held elsewhere (running).
    """

    def __init__(
        self,
        capacity: int,
        page_in: Callable[[int, int], None],
        skip: Callable[[int], bool] = lambda task_id: False,
    ) -> None:
        self.capacity = capacity
        self._page_in = page_in
        self._skip = skip
        self._items: deque[Task] = deque()
        self._present: dict[int, Task] = {}
        self._removed: set[int] = set()
        self._tombstones: set[int] = set()
        self._getters: deque[asyncio.Future[None]] = deque()
        #: Queued tasks may wait on disk beyond the window.
        self._backlog = False
        self._paging = False
        self._requested = 0
        #: The highest id the window has taken in (from offers or pages).
        self._cursor = 0

    def __len__(self) -> int:
        return len(self._present)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._present

    def __repr__(self) -> str:
        flags = " backlog" if self._backlog else ""
        idle = len(self._getters)
        return f"<ReadyQueue {len(self)}/{self.capacity}{flags} idle_workers={idle}>"

    @property
    def has_backlog(self) -> bool:
        """True when queued tasks may be waiting on disk, outside the window."""
        return self._backlog

    def offer(self, task: Task) -> bool:
        """Take ``task`` into the window if it fits and nothing older waits on disk.

        Returns ``False`` when refused; the task then stays queued on disk and a
        later page brings it in.
        """
        if self._backlog or len(self._present) >= self.capacity:
            self._backlog = True
            # A task re-queued with an old id must not fall behind the cursor.
            self._cursor = min(self._cursor, task.id - 1)
            self._maybe_page()
            return False
        self._push(task)
        return True

    def start_from_disk(self) -> None:
        """Mark that queued tasks wait on disk (e.g. after a restart) and page them in."""
        self._backlog = True
        self._cursor = 0
        self._maybe_page()

    def deliver(self, tasks: list[Task]) -> None:
        """Take in a page answered by ``page_in``; called with at most ``limit`` tasks."""
        self._paging = False
        requested = self._requested
        for task in tasks:
            self._cursor = max(self._cursor, task.id)
            if task.id in self._present or task.id in self._tombstones or self._skip(task.id):
                continue
            self._push(task)
        if len(tasks) < requested:
            self._backlog = False
        self._maybe_page()

    def _push(self, task: Task) -> None:
        self._items.append(task)
        self._present[task.id] = task
        self._cursor = max(self._cursor, task.id)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._getters:
            getter = self._getters.popleft()
            if not getter.done():
                getter.set_result(None)
                return

    def _maybe_page(self) -> None:
        room = self.capacity - len(self._present)
        if self._backlog and not self._paging and room >= max(1, self.capacity // 2):
            self._paging = True
            self._requested = room
            self._page_in(self._cursor, room)

    def remove(self, task_id: int) -> Task | None:
        """Take a waiting task out of the window; ``None`` if it is not there."""
        task = self._present.pop(task_id, None)
        if task is not None:
            self._removed.add(task_id)
        return task

    def tombstone(self, task_id: int) -> None:
        """Keep ``task_id`` out of pages delivered until ``untombstone`` (a cancel in flight)."""
        self._tombstones.add(task_id)

    def untombstone(self, task_id: int) -> None:
        """Undo ``tombstone``."""
        self._tombstones.discard(task_id)

    def get_nowait(self) -> Task | None:
        """The oldest waiting task, or ``None``."""
        while self._items:
            task = self._items.popleft()
            if task.id in self._removed:
                self._removed.discard(task.id)
                continue
            del self._present[task.id]
            self._maybe_page()
            return task
        return None

    async def get(self) -> Task:
        """Wait for and take the oldest task. Cancel-safe: a cancelled wait takes nothing."""
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
                # Woken and cancelled at once: pass the wake-up on, or a task waits forever.
                elif getter.done() and not getter.cancelled() and self._items:
                    self._wake_one()
                raise
