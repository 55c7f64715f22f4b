"""This node's Mercure subscribers, recorded where every node of the cluster reads them.

The Mercure subscriptions API lists the active subscriptions of the whole hub, so a
node writes its subscribers to ``taskserver_subscribers`` and reads the other
nodes' from there (``listed``, ``find``); its own it answers from memory, so a
subscriber is listed by its node at once and by the others after the next flush.

* **Off the hot path.** ``joined`` and ``left`` only note the change; one task
  writes what changed since its last round in one transaction (a subscriber that
  came and went in between is never written).
* **Bounded.** What is kept is the live subscribers (bounded by the connections
  this node holds) and the ones that left since the last round.
* **Nothing stale for long.** A round that fails (the database went away) makes
  the next one rewrite this node's rows whole, and so does this node's return after
  the cluster gave it up for dead (``rewrite``). Rows belong to their node's row
  (a foreign key: they go with it, when the node stops or is given up for dead) and
  are listed only while it has a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import orjson

from ...errors import ServerBusy
from . import schema as sql
from .reads import UNREACHABLE

log = logging.getLogger(__name__)
#: Seconds between rounds after a failed one, at most.
RETRY_CAP = 5.0

#: ``(subscriber IRI, topic selectors, JWT payload as JSON or None)``
Row = tuple[str, list[str], str | None]


class SharedSubscribers:
    """The subscribers of node ``node`` in the database, and the other nodes' from it."""

    def __init__(self, pool: asyncpg.Pool, node: str, lease: float) -> None:
        self._pool = pool
        self._node = node
        self._lease = lease
        self._live: dict[str, Row] = {}
        self._joined: set[str] = set()
        self._left: set[str] = set()
        self._rewrite = False  # the last round failed: rewrite this node's rows whole
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def joined(self, subscriber: str, topics: list[str], payload: str | None) -> None:
        """A subscriber of this node's hub (one stream) is active."""
        if self._closed:
            return
        self._live[subscriber] = (subscriber, topics, payload)
        self._joined.add(subscriber)
        self._start()

    def left(self, subscriber: str) -> None:
        """That subscriber's stream ended."""
        if self._closed:
            return
        self._live.pop(subscriber, None)
        if subscriber in self._joined:
            self._joined.discard(subscriber)  # never written
        else:
            self._left.add(subscriber)
        self._start()

    def rewrite(self) -> None:
        """Write this node's rows whole in the next round (the cluster had deleted them)."""
        if not self._closed:
            self._rewrite = True
            self._start()

    async def listed(self, topic: str | None, limit: int) -> list[Row]:
        """Up to ``limit`` subscribers of the *other* live nodes (with ``topic``
        among their selectors, when given), by IRI. ``ServerBusy`` when the database
        cannot be read."""
        params = (self._node, self._lease, topic, limit)
        return [
            (r[0], orjson.loads(r[1]), r[2])
            for r in await self._fetch(sql.SELECT_SUBSCRIBERS, params)
        ]

    async def find(self, subscriber: str) -> Row | None:
        """``subscriber`` if another live node has it."""
        rows = await self._fetch(sql.FIND_SUBSCRIBER, (self._node, self._lease, subscriber))
        return (rows[0][0], orjson.loads(rows[0][1]), rows[0][2]) if rows else None

    async def _fetch(self, query: str, params: tuple[object, ...]) -> list[asyncpg.Record]:
        try:
            rows: list[asyncpg.Record] = await self._pool.fetch(query, *params)
        except UNREACHABLE as exc:
            raise ServerBusy(f"the database cannot be read now: {exc}", retry_after=1.0) from None
        return rows

    async def close(self) -> None:
        """Stop writing (the node's rows go with its node row: ``PostgresBackend.close``)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def _start(self) -> None:
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = 0.1
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._round()
            except Exception as exc:  # the database went away: rewrite all once it is back
                self._rewrite = True
                self._joined.clear()
                self._left.clear()
                log.warning("recording Mercure subscribers in PostgreSQL failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_CAP, delay * 2)
                self._wake.set()
                continue
            delay = 0.1

    async def _round(self) -> None:
        rewrite, self._rewrite = self._rewrite, False
        if rewrite:
            rows, left = list(self._live.values()), []
        else:
            rows = [self._live[s] for s in self._joined if s in self._live]
            left = list(self._left)
        self._joined.clear()
        self._left.clear()
        if not (rows or left or rewrite):
            return
        async with self._pool.acquire() as conn, conn.transaction():
            if rewrite:
                await conn.execute(sql.DELETE_NODE_SUBSCRIBERS, [self._node])
            elif left:
                await conn.execute(sql.DELETE_SUBSCRIBERS, left)
            if rows:
                await conn.execute(
                    sql.INSERT_SUBSCRIBERS,
                    self._node,
                    [r[0] for r in rows],
                    [orjson.dumps(r[1]).decode() for r in rows],
                    [r[2] for r in rows],
                )
