"""The SQLite backend: one process owns the file; WAL; one writer thread.

* **Ids in memory.** One process owns the database, so task and event ids are
  counted in memory from the highest ids ever used (``sqlite_sequence`` keeps
  them past purges) and handed out at append time, at no cost.
* **One writer thread.** The writer's ``sqlite3`` connection is used only on one
  thread, so a batch is one thread hop (aiosqlite would hop once per statement;
  on a busy loop every hop waits for a loop iteration). Reads use their own
  read-only connection (``reads.py``).
* **Checkpoints off the writer.** A connection of its own copies the WAL into the
  database file every ``checkpoint_interval`` while there are commits; past
  ``wal_limit_pages`` the writer finishes the copy right after a commit so the
  WAL starts over.
* **The attempts journal** (``attempts.py``) records each start before it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import aiosqlite

from ...models import Event, TaskState
from ..backend import Opened
from ..intents import (
    Applied,
    Batch,
    Chore,
    DueTasks,
    Lease,
    Move,
    PageQueued,
    ProbeWrite,
    Purge,
    QueuePause,
    Read,
    Signals,
)
from ..payload import dumps
from ..rows import move_event
from . import schema as sql
from .attempts import SEGMENT_RECORDS, AttemptJournal
from .reads import SqliteReads
from .recovery import migrate, recover
from .writer import WriterThread

log = logging.getLogger(__name__)
#: Seconds between WAL checkpoints while there are commits.
CHECKPOINT_INTERVAL = 1.0
#: WAL size (in 4 KiB pages) past which the writer finishes a checkpoint itself,
#: so the WAL starts over: under sustained writes the background checkpoint
#: never catches up with the frames appended while it copies, and SQLite only
#: restarts a WAL that is wholly copied, so it grew without end (234 MB after
#: 110,000 tasks in one benchmark run). Also the size the file is cut back to.
#: At 9,000 tasks/s that is one writer checkpoint (a short copy and an fsync of
#: the database file) every few seconds.
WAL_LIMIT_PAGES = 16_384

#: Per conditional move: its statement, and the state and event it leads to.
#: Per conditional move: its statement (what it leads to: ``rows.MOVES``).
_MOVES = {"cancel": sql.CANCEL_PENDING, "retry": sql.RETRY_ENDED}


class SqliteBackend(SqliteReads):
    """Tasks and events in one SQLite file (or ``:memory:``, not durable)."""

    #: One process owns the file.
    shared = False

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        wal_limit_pages: int = WAL_LIMIT_PAGES,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        journal_segment: int = SEGMENT_RECORDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._wal_limit = wal_limit_pages
        self._checkpoint_interval = checkpoint_interval
        self._clock = clock
        #: Start markers that outlive the process (see attempts.py); none in memory.
        self.journal = (
            None if path == ":memory:" else AttemptJournal(path, segment_records=journal_segment)
        )
        self._conn: sqlite3.Connection | None = None
        self._thread: WriterThread | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._next_task_id = 1
        self._next_event_id = 1
        #: Transactions committed (the checkpoint loop skips idle periods).
        self.commits = 0
        #: Set by the checkpoint loop: the writer copies what is left of the WAL after
        #: its next commit (see WAL_LIMIT_PAGES).
        self._checkpoint_next = False
        #: Times the writer copied the whole WAL so that it starts over (WAL_LIMIT_PAGES).
        self.wal_restarts = 0

    # --- open and close ----------------------------------------------------------

    async def open(self) -> Opened:
        """``Backend.open``: also starts the reader and the checkpoint loop."""
        self._thread = WriterThread("taskserver-writer")
        queued, failed = await self._in_writer(self._open_sync)
        if self.path != ":memory:":  # a second connection to :memory: is another database
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (*sql.PRAGMAS, sql.READER_CACHE, "PRAGMA query_only = 1"):
                await self._reader.execute(pragma)
            self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in ("PRAGMA busy_timeout = 5000", sql.CHECKPOINTER_CACHE):
                await self._checkpointer.execute(pragma)
            self._checkpoints = asyncio.create_task(
                self._checkpoint_loop(), name="taskserver-store-checkpoint"
            )
        by_queue = await self.count_by_queue()
        return Opened(
            counts=await self.count_by_state(),
            unique_keys=await self.active_unique_keys(),
            group_heads=await self.serial_heads(),
            # from the counts: a second pass over every queued row would find the same
            queues_with_work=sorted(
                q for q, states in by_queue.items() if states.get(TaskState.QUEUED)
            ),
            queued_seconds=await self.queued_seconds(),
            recovered_queued=queued,
            recovered_failed=failed,
            committed_event_id=self._next_event_id - 1,
            paused_queues=await self.paused_queues(),
            active_by_queue=by_queue,
        )

    def _open_sync(self) -> tuple[int, int]:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in (*sql.PRAGMAS, sql.WRITER_CACHE, f"PRAGMA synchronous = {self._synchronous}"):
            conn.execute(pragma)
        if self.path != ":memory:":
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # _checkpoint_loop does it
            # When the WAL starts over, a file grown past this is cut back to it.
            conn.execute(f"PRAGMA journal_size_limit = {self._wal_limit * 4096}")
        migrate(conn, self.path)
        highest = sql.SELECT_HIGHEST_ID
        self._next_task_id = int(conn.execute(highest.format(table="tasks")).fetchone()[0]) + 1
        self._next_event_id = int(conn.execute(highest.format(table="events")).fetchone()[0]) + 1
        if self.journal is not None and not self.journal.lock():
            log.warning(
                "%s is used by another taskserver: attempts count only at commit here",
                self.journal.path,
            )
            self.journal = None
        recovered = recover(conn, self.journal, self.next_event_id, self._clock())
        if self.journal is not None:
            try:
                self.journal.open()  # after the recovery committed: what it held is in it
            except OSError:
                log.exception("attempts journal %s: attempts count only at commit", self.path)
                self.journal.close()
                self.journal = None
        self._conn = conn
        return recovered

    def bind(self, signals: Signals) -> None:
        """``Backend.bind``: no other server writes here."""

    def request_cancel(self, task_id: int) -> asyncio.Future[None]:
        """``Backend.request_cancel``: the tasks of this file run in this process."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def nodes(self) -> list[dict[str, Any]]:
        """``Backend.nodes``: one server, which ``/stats`` describes already."""
        return []

    async def close(self) -> None:
        """``Backend.close``."""
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
            self._checkpoints = None
        for conn in (self._reader, self._checkpointer):
            if conn is not None:
                await conn.close()
        self._reader = self._checkpointer = None
        if self._conn is not None:
            await self._in_writer(self._conn.close)
            self._conn = None
        if self.journal is not None:
            self.journal.close()  # the writer committed everything: no start is left uncounted
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database file from a connection of its own.

        SQLite would otherwise checkpoint inside whichever COMMIT crosses the
        threshold, stalling that batch (and every caller in it) for the copy and
        its fsync: that was most of the p99 latency. PASSIVE never blocks the writer.
        When the WAL has grown past ``wal_limit_pages`` anyway (writes never paused
        long enough for this copy to catch up), the writer copies the few frames
        left right after its next commit, and the WAL starts over (``_commit_sync``).
        """
        assert self._checkpointer is not None
        seen = self.commits
        while True:
            await asyncio.sleep(self._checkpoint_interval)
            if self.commits != seen:  # idle: nothing to copy, no disk work
                seen = self.commits
                try:
                    cursor = await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    row = await cursor.fetchone()
                except Exception:
                    log.exception("WAL checkpoint failed; trying again later")
                    continue
                if row is not None and row[1] > self._wal_limit:
                    self._checkpoint_next = True

    # --- ids, rows and starts (on the loop) ------------------------------------------

    def next_task_id(self) -> int:
        """``Backend.next_task_id``: counted in memory (this process owns the file)."""
        task_id = self._next_task_id
        self._next_task_id = task_id + 1
        return task_id

    def next_event_id(self) -> int:
        """``Backend.next_event_id``: counted in memory; batches commit in order."""
        event_id = self._next_event_id
        self._next_event_id = event_id + 1
        return event_id

    @property
    def last_event_id(self) -> int:
        """``Backend.last_event_id``."""
        return self._next_event_id - 1

    encode_new = staticmethod(sql.insert_row)
    encode_update = staticmethod(sql.update_row)

    def started(self, task_id: int, attempt: int, event_id: int) -> int | None:
        """``Backend.started``: a record in the attempts journal; the token is a full
        segment, freed once the batch holding its last start committed."""
        if self.journal is None:
            return None
        return self.journal.started(task_id, attempt, event_id)

    def release(self, token: int) -> None:
        """``Backend.release``."""
        if self.journal is not None:
            self.journal.retire(token)

    # --- the one write -------------------------------------------------------------------

    async def apply(self, batch: Batch) -> Applied:
        """``Backend.apply``, on the writer thread."""
        applied: Applied = await self._in_writer(self._commit_sync, batch)
        return applied

    def _commit_sync(self, batch: Batch) -> Applied:
        # The whole batch in one transaction, then the reads the batch asked for
        # (so they see exactly what on_commit will reflect).
        db = self._conn
        assert db is not None
        now = self._clock()
        applied = Applied()
        events = batch.events
        if batch.writes():  # a batch of reads only needs no transaction
            try:
                events = self._write(batch, db, now, applied)
            except BaseException:
                with contextlib.suppress(Exception):
                    db.execute("ROLLBACK")
                raise
            applied.wrote = True
            self.commits += 1
        if self._checkpoint_next:
            self._checkpoint_next = False
            self._finish_checkpoint(db)
        applied.durable.ready = batch.ready
        applied.durable.events = events
        applied.durable.delayed = batch.delayed
        for read, _ in batch.reads:
            try:
                rows = db.execute(*_read_query(read)).fetchall()
                applied.pages.append([sql.task_from_row(r) for r in rows])
            except Exception:
                log.exception("reading tasks for the scheduler failed")
                applied.pages.append([])
        return applied

    def _finish_checkpoint(self, db: sqlite3.Connection) -> None:
        # The background checkpoint copied most of the WAL; no frame is added while
        # the writer copies the rest, so the copy completes and the next
        # transaction starts the WAL over. A failure only means it grows a while.
        try:
            _, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("WAL checkpoint by the writer failed; trying again later")
        else:
            if frames == copied:
                self.wal_restarts += 1

    def _write(
        self, batch: Batch, db: sqlite3.Connection, now: float, applied: Applied
    ) -> list[Event]:
        """The batch's writes in one transaction (the caller rolls back); its events."""
        db.execute("BEGIN IMMEDIATE")
        for statement, values in sql.insert_many(
            sql.INSERT_TASK_PREFIX, sql.TASK_ROW, batch.inserts
        ):
            db.execute(statement, values)
        for statement, values in sql.update_many(list(batch.updates.values())):
            db.execute(statement, values)
        for run in batch.schedule_runs:
            db.execute(sql.UPSERT_SCHEDULE, run)
        events = batch.events
        if batch.moves:  # their events come with earlier ids: a copy, sorted
            events = events + [e for m in batch.moves if (e := _move(db, m, now, applied))]
            events.sort(key=lambda e: e.id)
        for chore, _ in batch.chores:
            counts = [max(0, db.execute(q, p).rowcount) for q, p in _chore_statements(chore)]
            applied.counts.append(sum(counts) if not isinstance(chore, Purge) else counts[-1])
        if events:
            text = sql.TEXT
            task_rows = [
                (e.id, e.task_id, text[e.type], e.json, now)  # type: ignore[index]
                for e in events
                if e.task_id is not None
            ]
            insert = sql.insert_many(sql.INSERT_TASK_EVENT_PREFIX, sql.TASK_EVENT_ROW, task_rows)
            if len(task_rows) < len(events):  # updates published to the hub, no task
                rows = [sql.event_row(e, now) for e in events if e.task_id is None]
                insert += sql.insert_many(sql.INSERT_EVENT_PREFIX, sql.EVENT_ROW, rows)
            for statement, values in insert:
                db.execute(statement, values)
        db.execute("COMMIT")
        return events


def _move(db: sqlite3.Connection, move: Move, now: float, applied: Applied) -> Event | None:
    """One conditional move inside the transaction; its event if it moved."""
    statement = _MOVES[move.kind]
    # The state before, for the server's counters: it may have moved since the
    # caller looked (queued -> running -> retrying ...).
    before = db.execute(sql.SELECT_STATE, (move.task_id,)).fetchone()
    changed = db.execute(statement, (move.at, move.at, move.task_id)).rowcount == 1
    applied.moved.append(TaskState(before[0]) if changed and before else None)
    if not changed:
        return None
    return move_event(move.kind, move.task_id, move.event_id, before[1], now)


def _chore_statements(chore: Chore) -> list[tuple[str, tuple[Any, ...]]]:
    if isinstance(chore, ProbeWrite):
        return [(sql.PROBE_WRITE, ())]
    if isinstance(chore, Lease):
        return []  # one process owns the file: no other server's tasks to rescue
    if isinstance(chore, QueuePause):
        if chore.paused:
            return [(sql.PAUSE_QUEUE, (chore.name,))]
        return [(sql.RESUME_QUEUE, (chore.name,))]
    if isinstance(chore, Purge):
        marks = ", ".join("?" for _ in chore.states)
        among = "" if chore.ids is None else sql.AMONG_IDS
        index = sql.PURGE_BY_AGE if chore.ids is None else ""
        params: tuple[Any, ...] = (*(s.value for s in chore.states), chore.before)
        if chore.ids is not None:
            params += (dumps(list(chore.ids)),)
        params += (chore.chunk,)
        return [
            (sql.PURGE_TASK_EVENTS.format(states=marks, among=among, index=index), params),
            (sql.PURGE_TASKS.format(states=marks, among=among, index=index), params),
        ]
    statements: list[tuple[str, tuple[Any, ...]]] = []
    if chore.before is not None:
        statements.append((sql.TRIM_EVENTS_BY_AGE, (chore.before, chore.chunk)))
    if chore.up_to is not None:
        statements.append((sql.TRIM_EVENTS_BY_COUNT, (chore.up_to, chore.chunk)))
    return statements


def _read_query(read: Read) -> tuple[str, tuple[Any, ...]]:
    if isinstance(read, PageQueued):
        return sql.SELECT_QUEUED_PAGE, (read.queue, dumps(list(read.busy_groups)), read.limit)
    if isinstance(read, DueTasks):
        return sql.SELECT_DUE, (read.now, read.limit)
    return sql.SELECT_GROUP_HEAD, (read.group,)
