"""Who runs what in a cluster: claims, due promotions, leases and rescues.

* **A claim** (``PageQueued``) moves up to ``limit`` queued tasks of a queue to
  ``running`` for this node and counts the attempt, in one statement, skipping rows
  another node is claiming (``FOR UPDATE SKIP LOCKED``): each attempt runs on
  exactly one node, and a node killed right after its claim has used the attempt.
  The tasks come back as they were *before* the claim (``queued``, the attempt not
  yet counted), because the worker that takes one applies ``lifecycle.start``,
  which writes the same values with its ``started`` event.
  A queue with a concurrency limit is claimed under a transaction-level advisory
  lock of its own, so the running tasks it counts over every node cannot change
  while it claims. A serial group's next task is claimable only when it is the
  oldest of its group not ended (a running one included); a unique index on the
  running task of each group is the backstop.
* **A due promotion** (``DueTasks``) moves waiting and retrying tasks that are due
  to ``queued``, by whichever node gets to them first, with their events.
* **A lease** (``Lease``) renews this node's heartbeat, folds the count deltas into
  the shared totals (``schema.py``, migration 2); one node at a time then
  rescues the running tasks of nodes whose heartbeat is older than the lease
  (and of nodes with no row at all): back to ``queued`` with the attempt counted,
  or ``failed`` when it was their last, as on a restart. A rescued row is marked
  ``node = ''``, so a late write by the node that lost it changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from ... import lifecycle
from ...models import Event, EventType, Task
from ..intents import DueTasks, GroupHead, PageQueued, Read
from ..payload import event_json
from . import schema as sql

log = logging.getLogger(__name__)


class Claims:
    """The cluster statements of one node (``node``: its id in ``taskserver_nodes``)."""

    def __init__(self, node: str, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self._clock = clock
        self._started = clock()
        #: called when this node's row had been deleted (given up for dead) and is back
        self.revived: Callable[[], None] = lambda: None

    def identity(self, now: float) -> tuple[Any, ...]:
        """``UPSERT_NODE``'s parameters after the id: host, pid, start, info."""
        return socket.gethostname(), os.getpid(), self._started, "{}"

    async def answer(
        self, conn: asyncpg.Connection, read: Read, now: float
    ) -> tuple[list[Task], list[Event]]:
        """The tasks ``read`` asks for (claimed, for a page), and the events to store with
        them; inside the caller's transaction.

        No savepoint (two more round trips per batch): a claim decides a group's turn on
        committed rows and skips locked ones, so the unique index on a group's running
        task is a backstop that no claim is expected to reach; if one did, the batch
        would fail as a whole, its callers told to retry (503) and nothing lost.
        """
        if isinstance(read, PageQueued):
            return await self._claim(conn, read, now), []
        if isinstance(read, DueTasks):
            return await self._promote(conn, read, now)
        assert isinstance(read, GroupHead)
        rows = await conn.fetch(sql.SELECT_GROUP_HEAD, read.group)
        return [sql.task_from_row(r) for r in rows], []

    async def _claim(self, conn: asyncpg.Connection, read: PageQueued, now: float) -> list[Task]:
        limit = read.limit
        if read.concurrency is not None:
            await conn.execute(sql.LOCK_QUEUE, read.queue)
            running = int(await conn.fetchval(sql.COUNT_RUNNING, read.queue))
            limit = min(limit, read.concurrency - running)
        if limit <= 0:
            return []
        rows = await conn.fetch(sql.CLAIM_QUEUE, self.node, now, limit, read.queue)
        rows = sorted(rows, key=lambda r: (-r[4], r[24]))  # run order: priority, then seq
        tasks = []
        for row in rows:
            task = sql.task_from_row(row)
            task.state = lifecycle.QUEUED  # as before the claim: the worker starts it
            task.attempts -= 1
            task.started_at = None
            tasks.append(task)
        return tasks

    async def _promote(
        self, conn: asyncpg.Connection, read: DueTasks, now: float
    ) -> tuple[list[Task], list[Event]]:
        rows = await conn.fetch(sql.PROMOTE_DUE, read.now, read.limit)
        tasks = sorted((sql.task_from_row(r) for r in rows), key=lambda t: t.available_at)
        queued, due = EventType.QUEUED, {"due": True}
        return tasks, [Event(0, t.id, queued, event_json(t, queued, due, now)) for t in tasks]

    async def lease(
        self, conn: asyncpg.Connection, info: str, lease: float, now: float
    ) -> tuple[int, list[Event]]:
        """Renew this node's heartbeat; rescue the tasks of nodes gone for ``lease`` s."""
        status = await conn.execute(sql.RENEW_NODE, self.node, info)
        if status.endswith(" 0"):
            log.error(
                "node %s had been given up for dead by the cluster (no heartbeat for %gs):"
                " its running tasks were rescued elsewhere",
                self.node,
                lease,
            )
            host, pid, started, _ = self.identity(now)
            await conn.execute(sql.UPSERT_NODE, self.node, host, pid, started, info)
            self.revived()  # what went with the node row is written again
        if await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", sql.LOCK_FOLD):
            await conn.execute(sql.FOLD_COUNTS)
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", sql.LOCK_RESCUE):
            return 0, []  # another node is rescuing
        dead = [r[0] for r in await conn.fetch(sql.SELECT_EXPIRED_NODES, lease, self.node)]
        queued, failed, events = await self.rescue(conn, dead, now)
        if dead:  # their subscribers go with them (a foreign key)
            await conn.execute("DELETE FROM taskserver_nodes WHERE id = ANY($1::text[])", dead)
            await conn.execute(sql.UNFOLLOW, dead)
        if queued or failed:
            log.warning(
                "rescued tasks of nodes without a lease (%s): %d re-queued, %d failed",
                ", ".join(dead) or "no node row",
                queued,
                failed,
            )
        return queued + failed, events

    async def rescue(
        self, conn: asyncpg.Connection, nodes: list[str], now: float
    ) -> tuple[int, int, list[Event]]:
        """Running tasks of ``nodes`` (and of nodes with no row): re-queued, or failed
        on their last attempt; returns the counts and the events to store."""
        rows = await conn.fetch(sql.SELECT_ORPHANS, nodes)
        requeue: list[int] = []
        events: list[Event] = []
        extra: dict[str, Any]
        for row in rows:
            task = sql.task_from_row(row)
            task.state = lifecycle.recovered_state(task.attempts, task.max_attempts)
            if task.state is lifecycle.FAILED:
                error = (
                    f"the node running it died during attempt {task.attempts} of"
                    f" {task.max_attempts} (killed, crashed or cut off); no attempts are left"
                )
                await conn.execute(sql.RESCUE_FAILED, now, task.id, error)
                type_, extra = EventType.FAILED, {"error": error}
            else:
                requeue.append(task.id)
                type_, extra = EventType.QUEUED, {"recovered": True}
            events.append(Event(0, task.id, type_, event_json(task, type_, extra, now)))
        if requeue:
            await conn.execute(sql.RESCUE_QUEUED, now, requeue)
        return len(requeue), len(rows) - len(requeue), events
