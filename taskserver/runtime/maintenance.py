"""The server's background loops: due tasks, retention, periodic schedules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from .. import lifecycle
from ..errors import ServerBusy, ServerClosed
from ..models import EventType, Task
from ..storage.payload import dumps
from .control import Control
from .enqueue import Enqueue
from .options import TaskSpec
from .periodic import Schedule, run_schedules
from .shared import Shared

log = logging.getLogger(__name__)
#: Due tasks promoted per writer round.
DUE_PAGE = 1_000
#: Seconds between a shared database's refreshes (counts, nodes, the claim safety
#: net) and the longest a due time set by another server waits to be seen.
CLUSTER_INTERVAL = 1.0


class Maintenance:
    """Runs the loops ``TaskServer.start`` starts and ``stop`` cancels."""

    def __init__(self, shared: Shared, enqueue: Enqueue, control: Control) -> None:
        self._s = shared
        self._enqueue = enqueue
        self._control = control
        self.schedules: dict[str, Schedule] = {}

    def start(self) -> list[asyncio.Task[None]]:
        """Start the loops; the caller cancels them."""
        loops = [
            asyncio.create_task(self.due_loop(), name="taskserver-due"),
            asyncio.create_task(self.retention_loop(), name="taskserver-maintenance"),
        ]
        if self.schedules:
            loops.append(asyncio.create_task(self.schedule_loop(), name="taskserver-periodic"))
        if self._s.store.shared:
            loops.append(asyncio.create_task(self.cluster_loop(), name="taskserver-cluster"))
        return loops

    async def cluster_loop(self) -> None:
        """On a shared database: renew this server's lease (rescuing the tasks of servers
        whose lease ran out), refresh the cluster's counts and nodes for ``/stats``, and
        claim from every known queue: the safety net under the notifications."""
        s = self._s
        while True:
            try:
                pool = s.pool
                info = {
                    "workers": s.settings.task_workers,
                    "busy": pool.busy if pool else 0,
                    "claimed": len(s.ready),
                }
                await s.store.lease(dumps(info))
                s.counts.refresh(await s.store.count_by_state())
                s.nodes = await s.store.backend.nodes()
                paused = set(await s.store.backend.paused_queues())  # by any server
                for name in paused - set(s.ready.paused()):
                    s.ready.pause(name)
                for name in set(s.ready.paused()) - paused:
                    s.ready.resume(name)
                s.ready.start_from_disk(list(s.ready.snapshot()))
                await s.store.unfollow_idle()
            except ServerClosed:
                return
            except Exception as exc:  # the database is away: the engine says so too
                log.warning("cluster heartbeat failed: %s", exc)
            await asyncio.sleep(min(CLUSTER_INTERVAL, s.settings.lease / 3))

    async def due_loop(self) -> None:
        """Move waiting and retrying tasks to ``queued`` when due; sleep until the next."""
        loop = asyncio.get_running_loop()
        while True:
            self._s.due_wake.clear()  # before the query: a commit after it wakes us again
            try:
                next_due = await self._s.store.next_due()
                now = self._s.clock()
                if next_due is not None and next_due <= now:
                    promoted: asyncio.Future[asyncio.Future[None] | None] = loop.create_future()
                    self._s.store.due_tasks(now, DUE_PAGE, partial(self._promote, promoted))
                    stored = await promoted
                    if stored is not None:
                        await stored  # or the next query sees them again
                    continue
            except ServerBusy:
                pass  # the store is closing
            except Exception:
                log.exception("scheduling due tasks failed; retrying in a second")
                next_due = self._s.clock() + 1
            delay = None if next_due is None else max(0.0, next_due - self._s.clock())
            if self._s.store.shared:  # other servers' delayed tasks wake nobody here
                delay = CLUSTER_INTERVAL if delay is None else min(delay, CLUSTER_INTERVAL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._s.due_wake.wait()

    def _promote(
        self, promoted: asyncio.Future[asyncio.Future[None] | None], tasks: list[Task]
    ) -> None:
        # Called by the writer between batches with due tasks as stored.
        stored = None
        if self._s.store.shared:
            # The database promoted them (with their events): claim some.
            for task in tasks:
                self._s.ready.offer(task)
            tasks = []
        for task in tasks:
            previous = lifecycle.make_due(task)
            stored = self._s.store.update_task(task, EventType.QUEUED, {"due": True}, ready=True)
            self._s.counts.move(task.queue, previous, lifecycle.QUEUED)
            self._s.tally.queued(task)
        if not promoted.done():  # the due loop may have been cancelled (stop)
            promoted.set_result(stored)

    async def retention_loop(self) -> None:
        """Apply retention: purge old ended tasks and trim the event history."""
        s = self._s.settings
        while True:
            await asyncio.sleep(s.maintenance_interval)
            try:
                if s.retention > 0:
                    purged = await self._control.purge(s.retention)
                    if purged:
                        log.info("retention: purged %d ended tasks", purged)
                before = self._s.clock() - s.event_retention if s.event_retention > 0 else None
                keep = s.max_events or None
                if before is not None or keep is not None:
                    while await self._s.store.trim_events(before=before, keep=keep):
                        pass
            except (ServerBusy, ServerClosed):
                return
            except Exception:
                log.exception("retention maintenance failed")

    async def schedule_loop(self) -> None:
        """Periodic schedules: see ``periodic.run_schedules``."""
        last_due = await self._s.store.schedules()
        await run_schedules(self.schedules, last_due, self._enqueue_run, self._s.clock)

    async def _enqueue_run(self, schedule: Schedule, due: float) -> None:
        options = {"name": schedule.name, **schedule.options}
        spec = TaskSpec(schedule.data, options)
        await self._enqueue.insert([spec], schedule=(schedule.name, due))
