"""A writer round's writes on PostgreSQL, inside the transaction ``backend.py`` opens.

``Writes.write`` applies a batch's writes in order (cron due times, new rows, full-row
updates by the node that holds the tasks, conditional moves, chores) and returns the
events to store; ``Writes.store_events`` then gives those their final ids, last in the
transaction (``backend.py``'s module docstring says why that makes ids gap-safe), and
notifies the other nodes. What a write could not do (a unique key held elsewhere, a
row another node rescued) is told in ``Applied``, and its events are not stored.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import orjson

from ...models import Event, EventType, TaskState
from ..intents import Applied, Batch, Lease, Move, ProbeWrite, Purge, QueuePause
from ..rows import move_event
from . import schema as sql
from .claims import Claims

log = logging.getLogger(__name__)
#: The channel every commit with events notifies, its payload the new last id.
EVENTS_CHANNEL = "taskserver_events"
STORE_EVENTS = sql.STORE_EVENTS.format(channel=EVENTS_CHANNEL)
#: Queue names a notification carries at most (its payload must stay under 8,000 bytes);
#: past it, it says "*": maybe any queue.
NOTIFY_QUEUES_BYTES = 7_000
#: Inserts of a batch's new rows at most, while the holders of their keys keep ending.
INSERT_TRIES = 4

#: Per conditional move: its statement (what it leads to: ``rows.MOVES``).
_MOVES = {"cancel": sql.CANCEL_PENDING, "retry": sql.RETRY_ENDED}


class Writes:
    """The writes of node ``node`` (its claims and lease: ``claims.py``)."""

    def __init__(self, node: str, claims: Claims, lease: float) -> None:
        self.node = node
        self.lease = lease
        self._claims = claims

    async def write(
        self, conn: asyncpg.Connection, batch: Batch, now: float, applied: Applied
    ) -> list[Event]:
        """The batch's writes, inside the caller's transaction; the events to store."""
        drop: set[int] = set()  # tasks whose events must not be stored
        for name, due in batch.schedule_runs:
            if await conn.fetchval(sql.UPSERT_SCHEDULE, name, due) is None:
                # Another node enqueued this due time already: not again.
                ids = batch.schedule_ids.get(name, [])
                drop.update(ids)
                applied.conflicts.update(dict.fromkeys(ids))
        rows = [r for r in batch.inserts if r[0] not in drop] if drop else batch.inserts
        if rows:
            written = await _insert(conn, batch, rows, applied, drop)
            if batch.unique_since:
                await _recent_holders(conn, batch, written, applied, drop)
        if batch.updates:
            updates = list(batch.updates.values())
            written = {
                r[0]
                for r in await conn.fetch(sql.UPDATE_TASKS, *sql.columns(updates, 14), self.node)
            }
            if len(written) < len(updates):
                stale = set(batch.updates) - written
                log.warning("tasks %s were rescued by another node: not written", sorted(stale))
                drop |= stale
        events = [e for e in batch.events if e.task_id not in drop] if drop else batch.events
        for move in batch.moves:
            event = await _move(conn, move, now, applied)
            if event is not None:
                events.append(event)
        if batch.moves:
            events.sort(key=lambda e: e.id)
        for chore, _ in batch.chores:
            count, made = await self._chore(conn, chore, now)
            applied.counts.append(count)
            events.extend(made)
            applied.durable.queues.extend(
                t for t in dict.fromkeys(_queued_queues(made)) if t is not None
            )
        return events

    async def store_events(
        self, conn: asyncpg.Connection, events: list[Event], now: float
    ) -> list[Event]:
        """Give ``events`` their final ids (taken last: ``backend.py``'s docstring), insert
        them and notify the other nodes when one follows the events or the events made
        work (``schema.STORE_EVENTS``); inside the caller's transaction."""
        columns = sql.columns([sql.event_row(e) for e in events], 7)
        queues = " ".join(q for q in dict.fromkeys(_queued_queues(events)) if q is not None)
        if len(queues) > NOTIFY_QUEUES_BYTES:
            queues = "*"
        tail = f" {queues}" if queues else ""
        last = int(await conn.fetchval(STORE_EVENTS, *columns, now, tail, self.node))
        first = last - len(events) + 1
        return [
            Event(first + i, e.task_id, e.type, e.json, e.topics, e.private, e.uid, e.retry)
            for i, e in enumerate(events)
        ]

    async def _chore(
        self, conn: asyncpg.Connection, chore: Any, now: float
    ) -> tuple[int, list[Event]]:
        if isinstance(chore, ProbeWrite):
            await conn.execute(sql.PROBE_WRITE)
            return 0, []
        if isinstance(chore, Lease):
            return await self._claims.lease(conn, chore.info, self.lease, now)
        if isinstance(chore, QueuePause):
            await conn.execute(sql.PAUSE_QUEUE if chore.paused else sql.RESUME_QUEUE, chore.name)
            return 0, []
        # Purges and trims: one node at a time (the others wait their turn).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", sql.LOCK_PURGE)
        if isinstance(chore, Purge):
            states = [s.value for s in chore.states]
            if chore.ids is not None:
                among = list(chore.ids)
                purged = await conn.fetchval(
                    sql.PURGE_AMONG, states, chore.before, chore.chunk, among
                )
                return int(purged), []
            return int(await conn.fetchval(sql.PURGE, states, chore.before, chore.chunk)), []
        total = 0
        if chore.before is not None:
            total += int(await conn.fetchval(sql.TRIM_EVENTS_BY_AGE, chore.before, chore.chunk))
        if chore.up_to is not None:
            total += int(await conn.fetchval(sql.TRIM_EVENTS_BY_COUNT, chore.up_to, chore.chunk))
        return total, []


async def _insert(
    conn: asyncpg.Connection,
    batch: Batch,
    rows: list[tuple[Any, ...]],
    applied: Applied,
    drop: set[int],
) -> set[int]:
    """Insert ``rows``; the ids written. A row whose unique key an active task holds is
    kept out and answered with that holder (``applied.conflicts``).

    The insert and the holders' look-up are two statements: a holder that ends in
    between frees its key unseen by the look-up. Its keys are free then, so those rows
    are inserted again (each try a new snapshot, read committed), a few times at most:
    one task of a bulk call must not fail alone after the others were written.
    """
    written: set[int] = set()
    pending = rows
    for _ in range(INSERT_TRIES):
        got = {r[0] for r in await conn.fetch(sql.INSERT_TASKS, *sql.columns(pending, 14))}
        written |= got
        if len(got) == len(pending):
            return written
        ids = {r[0] for r in pending}
        kept = [t for t in batch.inserted if t.id in ids and t.id not in got]
        keys = [t.unique_key for t in kept if t.unique_key is not None]
        holders: dict[str, int] = {
            r[0]: r[1] for r in await conn.fetch(sql.SELECT_KEY_HOLDERS, keys)
        }
        freed: set[int] = set()
        for task in kept:
            holder = holders.get(task.unique_key) if task.unique_key is not None else None
            if holder is None:
                freed.add(task.id)
            else:
                applied.conflicts[task.id] = holder
                drop.add(task.id)
        if not freed:
            return written
        pending = [r for r in pending if r[0] in freed]
    for row in pending:  # keys that changed hands at every try: the caller is told
        applied.conflicts[row[0]] = 0
        drop.add(row[0])
    return written


async def _recent_holders(
    conn: asyncpg.Connection,
    batch: Batch,
    written: set[int],
    applied: Applied,
    drop: set[int],
) -> None:
    """Keep out the new ``unique_for`` tasks whose key succeeded recently after all.

    The server looked for a recent success before the insert, but the holder may
    have succeeded on another node since: the index no longer holds its key, and
    that commit can land while this insert waits on its row. This statement runs
    after the insert, so (read committed) it sees that success; the new rows go.
    """
    ids = [i for i in batch.unique_since if i in written]
    if not ids:
        return
    sinces = [batch.unique_since[i] for i in ids]
    found = await conn.fetch(sql.SELECT_RECENT_HOLDERS, ids, sinces)
    if not found:
        return
    await conn.execute(sql.DELETE_TASKS, [r[0] for r in found])
    for new_id, holder in found:
        applied.conflicts[new_id] = int(holder)
        drop.add(new_id)


def _queued_queues(events: list[Event]) -> list[str | None]:
    """The queues named by ``queued`` events (what other nodes made ready)."""
    return [orjson.loads(e.json).get("queue") for e in events if e.type == EventType.QUEUED.value]


async def _move(conn: asyncpg.Connection, move: Move, now: float, applied: Applied) -> Event | None:
    """One conditional move inside the transaction (a savepoint of its own, so a unique
    key taken meanwhile by another node fails the move, not the batch)."""
    statement = _MOVES[move.kind]
    try:
        async with conn.transaction():
            row = await conn.fetchrow(sql.SELECT_STATE_FOR_UPDATE, move.task_id)
            status = await conn.execute(statement, move.at, move.task_id)
    except asyncpg.UniqueViolationError:
        applied.moved.append(None)
        return None
    changed = status.endswith(" 1")
    applied.moved.append(TaskState(row[0]) if changed and row else None)
    if not changed or row is None:
        return None
    return move_event(move.kind, move.task_id, move.event_id, row[1], now)
