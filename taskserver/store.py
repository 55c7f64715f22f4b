"""Durable storage in SQLite, with group commit.

The contract, method by method, is on each method. The whole of it:

* **One writer.** Every write (a new task, a state change, an event) is appended
  to the current *batch* in memory, synchronously, and a single writer coroutine
  commits whole batches, each in one transaction. Callers that need durability
  await the batch (``await store.insert_task(...)[1]``); callers that do not
  (workers reporting outcomes) just append. While one batch commits the next one
  fills, so the cost of an fsync is shared by everything that arrived meanwhile.
* **Ids are assigned in memory**, at append time, for tasks and events. Batches
  commit in order, so ids are committed in increasing order: once an event id is
  visible, no smaller one will ever appear (``Last-Event-ID`` replay relies on it).
  A batch that fails to commit leaves gaps, never duplicates.
* **Nothing is pushed before it is stored.** After a commit the writer calls
  ``on_commit`` with the batch's tasks and events, synchronously, before it starts
  the next batch; that is where the server feeds the ready queue and the hub.
* **Reads** that must see a consistent order with writes (paging queued tasks
  into memory, conditional cancels) run inside the writer; plain queries use a
  second, read-only connection so they never wait behind a commit (WAL).

Only this module knows SQL. A PostgreSQL store would implement the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import orjson

from .errors import NotSerializable, ServerBusy
from .models import Event, EventType, Task, TaskState

log = logging.getLogger(__name__)

# --- schema -----------------------------------------------------------------

#: Numbered migrations; ``PRAGMA user_version`` records how many have run.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        id            INTEGER PRIMARY KEY,
        state         TEXT    NOT NULL,
        data          TEXT    NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        max_attempts  INTEGER NOT NULL,
        timeout       REAL,
        progress      REAL,
        message       TEXT,
        result        TEXT,
        error         TEXT,
        traceback     TEXT,
        finish_error  TEXT,
        created_at    REAL    NOT NULL,
        started_at    REAL,
        finished_at   REAL,
        updated_at    REAL    NOT NULL
    );
    CREATE INDEX tasks_by_state ON tasks (state, id);
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY,
        task_id  INTEGER,          -- NULL for updates published to the Mercure hub
        type     TEXT,
        data     TEXT    NOT NULL,
        topics   TEXT,             -- JSON array, published updates only
        private  INTEGER NOT NULL DEFAULT 0,
        uid      TEXT,             -- the publisher's id of a published update
        retry    INTEGER
    );
    CREATE INDEX events_by_task ON events (task_id, id) WHERE task_id IS NOT NULL;
    CREATE UNIQUE INDEX events_by_uid ON events (uid) WHERE uid IS NOT NULL;
    """,
)

PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA busy_timeout = 5000",
    "PRAGMA temp_store = MEMORY",
    # 64 MiB of page cache: the hot part of the tasks table and its index.
    "PRAGMA cache_size = -65536",
)

TASK_COLUMNS = (
    "id, state, data, attempts, max_attempts, timeout, progress, message, result, error,"
    " traceback, finish_error, created_at, started_at, finished_at, updated_at"
)
INSERT_TASK = (
    "INSERT INTO tasks (id, state, data, attempts, max_attempts, timeout, created_at, updated_at)"
    " VALUES (?, ?, ?, 0, ?, ?, ?, ?)"
)
UPDATE_TASK = (
    "UPDATE tasks SET state = ?, attempts = ?, progress = ?, message = ?, result = ?, error = ?,"
    " traceback = ?, finish_error = ?, started_at = ?, finished_at = ?, updated_at = ?"
    " WHERE id = ?"
)
CANCEL_PENDING = (
    "UPDATE tasks SET state = 'cancelled', finished_at = ?, updated_at = ?"
    " WHERE id = ? AND state IN ('queued', 'waiting', 'retrying')"
)
INSERT_EVENT = (
    "INSERT INTO events (id, task_id, type, data, topics, private, uid, retry)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
EVENT_COLUMNS = "id, task_id, type, data, topics, private, uid, retry"
SELECT_EVENT_BY_UID = "SELECT id FROM events WHERE uid = ?"
SELECT_TASK = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?"
SELECT_QUEUED_PAGE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = 'queued' AND id > ? ORDER BY id LIMIT ?"
)
SELECT_TASKS = f"SELECT {TASK_COLUMNS} FROM tasks WHERE id > ? ORDER BY id LIMIT ?"
SELECT_TASKS_BY_STATE = (
    f"SELECT {TASK_COLUMNS} FROM tasks WHERE state = ? AND id > ? ORDER BY id LIMIT ?"
)
SELECT_EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? ORDER BY id LIMIT ?"
SELECT_ALL_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE id > ? AND task_id IS NOT NULL ORDER BY id LIMIT ?"
)
SELECT_TASK_EVENTS_AFTER = (
    f"SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?"
)
COUNT_BY_STATE = "SELECT state, count(*) FROM tasks GROUP BY state"
SELECT_RUNNING = "SELECT id, attempts, max_attempts FROM tasks WHERE state = 'running'"
RECOVER_FAILED = (
    "UPDATE tasks SET state = 'failed', error = ?, finished_at = ?, updated_at = ? WHERE id = ?"
)
RECOVER_QUEUED = (
    "UPDATE tasks SET state = 'queued', progress = NULL, message = NULL, updated_at = ?"
    " WHERE id = ?"
)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def event_json(task: Task, type_: EventType, extra: dict[str, Any] | None, now: float) -> str:
    """The stored and pushed payload of one event about ``task``."""
    payload: dict[str, Any] = {
        "task_id": task.id,
        "type": type_.value,
        "state": task.state.value,
        "attempt": task.attempts,
        "at": now,
    }
    if extra:
        payload.update(extra)
    return _dumps(payload)


def _task_from_row(row: Any) -> Task:
    return Task(
        id=row[0],
        state=TaskState(row[1]),
        data=orjson.loads(row[2]),
        attempts=row[3],
        max_attempts=row[4],
        timeout=row[5],
        progress=row[6],
        message=row[7],
        result=None if row[8] is None else orjson.loads(row[8]),
        error=row[9],
        traceback=row[10],
        finish_error=row[11],
        created_at=row[12],
        started_at=row[13],
        finished_at=row[14],
        updated_at=row[15],
    )


def _event_from_row(row: Any) -> Event:
    topics = tuple(orjson.loads(row[4])) if row[4] else ()
    return Event(row[0], row[1], row[2], row[3], topics, bool(row[5]), row[6], row[7])


def _event_row(e: Event) -> tuple[Any, ...]:
    topics = _dumps(list(e.topics)) if e.topics else None
    return (e.id, e.task_id, e.type, e.json, topics, int(e.private), e.uid, e.retry)


@dataclass(slots=True)
class Committed:
    """What one batch made durable, handed to ``on_commit`` in commit order."""

    inserted: list[Task]
    events: list[Event]
    #: ids of tasks a conditional cancel moved to ``cancelled`` in this batch.
    cancelled: list[int]


@dataclass(slots=True)
class _Cancel:
    task_id: int
    event_id: int
    at: float
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _Page:
    after_id: int
    limit: int
    deliver: Callable[[list[Task]], None]


@dataclass(slots=True)
class _Batch:
    future: asyncio.Future[None]
    inserts: list[tuple[Any, ...]] = field(default_factory=list)
    inserted: list[Task] = field(default_factory=list)
    # One full-row write per task; a later state of the same task replaces an earlier one.
    updates: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    cancels: list[_Cancel] = field(default_factory=list)
    pages: list[_Page] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.events) + len(self.cancels)


class Store:
    """SQLite storage for tasks and events, written by one group-committing coroutine.

    ``on_commit`` is called synchronously after every successful commit; it must
    not block. ``clock`` gives seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        max_pending_writes: int = 100_000,
        on_commit: Callable[[Committed], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._max_pending = max_pending_writes
        self._on_commit = on_commit or (lambda committed: None)
        self._clock = clock
        self._db: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._next_task_id = 1
        self._next_event_id = 1
        self._batch: _Batch | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        #: What ``open`` found left running by a dead process.
        self.recovered_queued = 0
        self.recovered_failed = 0

    def __repr__(self) -> str:
        pending = len(self._batch) if self._batch else 0
        state = "closing" if self._closing else ("open" if self._db else "closed")
        return f"<Store {self.path!r} {state} pending={pending} commits={self.commits}>"

    # --- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Connect, migrate, load the id counters, recover dead work and start the writer."""
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        for pragma in (*PRAGMAS, f"PRAGMA synchronous = {self._synchronous}"):
            await self._db.execute(pragma)
        await self._migrate(self._db)
        if self.path == ":memory:":
            self._reader = self._db  # a second connection would open another, empty database
        else:
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (*PRAGMAS, "PRAGMA query_only = 1"):
                await self._reader.execute(pragma)
        for sql, attr in (
            ("SELECT coalesce(max(id), 0) FROM tasks", "_next_task_id"),
            ("SELECT coalesce(max(id), 0) FROM events", "_next_event_id"),
        ):
            rows = list(await self._db.execute_fetchall(sql))
            setattr(self, attr, int(rows[0][0]) + 1)
        await self._recover(self._db)
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="taskserver-store-writer")

    async def close(self) -> None:
        """Commit whatever is pending, stop the writer and close the connections."""
        self._closing = True
        self._wake.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        if self._reader is not None and self._reader is not self._db:
            await self._reader.close()
        if self._db is not None:
            await self._db.close()
        self._db = self._reader = None

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        rows = list(await db.execute_fetchall("PRAGMA user_version"))
        version = int(rows[0][0])
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this taskserver knows "
                f"({len(MIGRATIONS)}); upgrade taskserver"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await db.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, script.split(";")):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {number}")
            await db.execute("COMMIT")
            log.info("migrated %s to schema version %d", self.path, number)

    async def _recover(self, db: aiosqlite.Connection) -> None:
        """Return tasks a dead process left ``running`` to ``queued``; fail those out of attempts.

        The attempt they were on was counted when they started, so a task that
        kills the process every time ends ``failed`` after ``max_attempts``. Runs
        in ``open`` before the writer starts, in one transaction with its events.
        """
        rows = list(await db.execute_fetchall(SELECT_RUNNING))
        if not rows:
            return
        now = self._clock()
        error = "the server stopped while the task ran, and no attempts are left"
        updates: list[tuple[str, tuple[Any, ...]]] = []
        events: list[tuple[Any, ...]] = []
        extra: dict[str, Any]
        for task_id, attempts, max_attempts in rows:
            out_of_attempts = attempts >= max_attempts
            stub = Task(
                id=task_id,
                data=None,
                max_attempts=max_attempts,
                timeout=None,
                state=TaskState.FAILED if out_of_attempts else TaskState.QUEUED,
                created_at=now,
                updated_at=now,
                attempts=attempts,
            )
            if out_of_attempts:
                self.recovered_failed += 1
                updates.append((RECOVER_FAILED, (error, now, now, task_id)))
                type_, extra = EventType.FAILED, {"error": error}
            else:
                self.recovered_queued += 1
                updates.append((RECOVER_QUEUED, (now, task_id)))
                type_, extra = EventType.QUEUED, {"recovered": True}
            events.append(
                (self._next_event_id, task_id, type_.value, event_json(stub, type_, extra, now))
            )
            self._next_event_id += 1
        await db.execute("BEGIN IMMEDIATE")
        for sql, params in updates:
            await db.execute(sql, params)
        await db.executemany(INSERT_EVENT, events)
        await db.execute("COMMIT")
        log.warning(
            "recovered tasks left running: %d re-queued, %d failed (no attempts left)",
            self.recovered_queued,
            self.recovered_failed,
        )

    # --- group-committed writes ----------------------------------------------

    def _current(self) -> _Batch:
        if self._batch is None:
            self._batch = _Batch(future=asyncio.get_running_loop().create_future())
            self._wake.set()
        return self._batch

    def _check_room(self, extra: int) -> _Batch:
        batch = self._current()
        if self._closing:
            raise ServerBusy("the store is closing")
        if len(batch) + extra > self._max_pending:
            raise ServerBusy("too many writes are waiting for the disk", retry_after=1.0)
        return batch

    def _new_event(
        self, batch: _Batch, task: Task, type_: EventType, extra: dict[str, Any] | None, now: float
    ) -> Event:
        event = Event(
            self._next_event_id, task.id, type_.value, event_json(task, type_, extra, now)
        )
        self._next_event_id += 1
        batch.events.append(event)
        return event

    def insert_tasks(
        self, payloads: Iterable[tuple[str, Any]], *, max_attempts: int, timeout: float | None
    ) -> tuple[list[Task], asyncio.Future[None]]:
        """Append new ``queued`` tasks and their ``queued`` events to the current batch.

        ``payloads`` holds ``(json_text, decoded_value)`` pairs, already validated.
        All of them land in the same transaction. Returns the tasks (ids assigned,
        increasing) and the batch future, done when they are committed. Raises
        ``ServerBusy`` when the batch is full; then nothing was appended.
        """
        items = list(payloads)
        batch = self._check_room(2 * len(items))
        now = self._clock()
        tasks: list[Task] = []
        for text, value in items:
            task = Task(
                id=self._next_task_id,
                data=value,
                state=TaskState.QUEUED,
                max_attempts=max_attempts,
                timeout=timeout,
                created_at=now,
                updated_at=now,
            )
            self._next_task_id += 1
            batch.inserts.append((task.id, "queued", text, max_attempts, timeout, now, now))
            batch.inserted.append(task)
            self._new_event(batch, task, EventType.QUEUED, None, now)
            tasks.append(task)
        return tasks, batch.future

    def update_task(
        self, task: Task, type_: EventType, extra: dict[str, Any] | None = None
    ) -> asyncio.Future[None]:
        """Write ``task``'s current state as a whole row, with an event, in the current batch.

        The caller owns ``task`` (a worker while it runs, the ready queue while it
        waits), so a full-row write cannot undo someone else's change. A task
        that succeeded has its ``result`` encoded here: ``NotSerializable`` is raised
        (and nothing appended) when it cannot be. Never blocks; the returned future
        is the batch's, done at commit.
        """
        result = None
        if task.state is TaskState.SUCCEEDED and task.result is not None:
            try:
                result = _dumps(task.result)
            except TypeError as exc:
                raise NotSerializable(
                    f"the task's result cannot be encoded as JSON: {exc}", field="result"
                ) from None
        batch = self._current()  # never refused: outcomes of running work must not be lost
        now = self._clock()
        task.updated_at = now
        batch.updates[task.id] = (
            task.state.value,
            task.attempts,
            task.progress,
            task.message,
            result,
            task.error,
            task.traceback,
            task.finish_error,
            task.started_at,
            task.finished_at,
            now,
            task.id,
        )
        self._new_event(batch, task, type_, extra, now)
        return batch.future

    def publish_update(
        self,
        topics: tuple[str, ...],
        data: str,
        *,
        private: bool = False,
        uid: str | None = None,
        type_: str | None = None,
        retry: int | None = None,
    ) -> tuple[Event, asyncio.Future[None]]:
        """Append an update published to the hub (no task) to the current batch.

        It is stored in the same sequence as task events, so one ``Last-Event-ID``
        replays both in order. ``uid`` must be unique (the caller checks with
        ``find_event``; a duplicate fails the whole batch). Raises ``ServerBusy``
        when the batch is full.
        """
        batch = self._check_room(1)
        event = Event(self._next_event_id, None, type_, data, topics, private, uid, retry)
        self._next_event_id += 1
        batch.events.append(event)
        return event, batch.future

    async def find_event(self, uid: str) -> int | None:
        """The sequence number of the stored event with publisher id ``uid``, or ``None``."""
        rows = await self._fetch(SELECT_EVENT_BY_UID, (uid,))
        return int(rows[0][0]) if rows else None

    def cancel_pending(self, task_id: int) -> asyncio.Future[bool]:
        """Cancel a task that waits on disk (queued, waiting or retrying), atomically.

        Resolves to ``True`` when this call moved it to ``cancelled`` (its event is
        then committed and in ``Committed.cancelled``), ``False`` when it was in
        another state or does not exist.
        """
        batch = self._check_room(2)
        # The event id is taken now, so ids stay in commit order; unused, it is a gap.
        op = _Cancel(
            task_id, self._next_event_id, self._clock(), asyncio.get_running_loop().create_future()
        )
        self._next_event_id += 1
        batch.cancels.append(op)
        return op.future

    def page_queued(self, after_id: int, limit: int, deliver: Callable[[list[Task]], None]) -> None:
        """Ask the writer for up to ``limit`` queued tasks with ids above ``after_id``.

        ``deliver`` is called from the writer, after the current batch commits and
        before the next starts, so no commit can slip between the query and the
        delivery. It must not block.
        """
        self._current().pages.append(_Page(after_id, limit, deliver))

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, None
            if batch is None:
                if self._closing:
                    return
                continue
            try:
                committed = await self._commit(batch)
            except Exception as exc:
                log.exception("commit of %d writes failed", len(batch))
                await self._rollback()
                for op in batch.cancels:
                    op.future.set_exception(exc)
                batch.future.set_exception(exc)
                # Nobody may be awaiting (workers append without waiting): mark it seen.
                batch.future.exception()
                continue
            self.commits += 1
            try:
                self._on_commit(committed)
            except Exception:
                log.exception("on_commit hook failed")
            for page in batch.pages:
                await self._deliver_page(page)
            batch.future.set_result(None)

    async def _commit(self, batch: _Batch) -> Committed:
        db = self._db
        assert db is not None
        cancelled: list[int] = []
        await db.execute("BEGIN IMMEDIATE")
        if batch.inserts:
            await db.executemany(INSERT_TASK, batch.inserts)
        if batch.updates:
            await db.executemany(UPDATE_TASK, list(batch.updates.values()))
        events = batch.events
        for op in batch.cancels:
            cursor = await db.execute(CANCEL_PENDING, (op.at, op.at, op.task_id))
            if cursor.rowcount == 1:
                cancelled.append(op.task_id)
                stub = Task(
                    id=op.task_id,
                    data=None,
                    state=TaskState.CANCELLED,
                    max_attempts=1,
                    timeout=None,
                    created_at=op.at,
                    updated_at=op.at,
                )
                events.append(
                    Event(
                        op.event_id,
                        op.task_id,
                        EventType.CANCELLED,
                        event_json(stub, EventType.CANCELLED, None, op.at),
                    )
                )
        if events:
            events.sort(key=lambda e: e.id)
            await db.executemany(INSERT_EVENT, [_event_row(e) for e in events])
        await db.execute("COMMIT")
        for op in batch.cancels:
            op.future.set_result(op.task_id in cancelled)
        return Committed(batch.inserted, events, cancelled)

    async def _rollback(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                await self._db.execute("ROLLBACK")

    async def _deliver_page(self, page: _Page) -> None:
        assert self._db is not None
        try:
            rows = await self._db.execute_fetchall(SELECT_QUEUED_PAGE, (page.after_id, page.limit))
            page.deliver([_task_from_row(r) for r in rows])
        except Exception:
            log.exception("paging queued tasks into memory failed")

    # --- reads ----------------------------------------------------------------

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        assert self._reader is not None
        return list(await self._reader.execute_fetchall(sql, params))

    async def get_task(self, task_id: int) -> Task | None:
        """The committed state of one task, or ``None``."""
        rows = await self._fetch(SELECT_TASK, (task_id,))
        return _task_from_row(rows[0]) if rows else None

    async def list_tasks(self, *, state: TaskState | None, after: int, limit: int) -> list[Task]:
        """Up to ``limit`` committed tasks with ids above ``after``, in id order."""
        if state is None:
            rows = await self._fetch(SELECT_TASKS, (after, limit))
        else:
            rows = await self._fetch(SELECT_TASKS_BY_STATE, (state.value, after, limit))
        return [_task_from_row(r) for r in rows]

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        """Up to ``limit`` committed events with ids above ``after_id``, in id order.

        ``task_id`` keeps one task's events; ``tasks_only`` drops published updates.
        """
        if task_id is None:
            sql = SELECT_ALL_TASK_EVENTS_AFTER if tasks_only else SELECT_EVENTS_AFTER
            rows = await self._fetch(sql, (after_id, limit))
        else:
            rows = await self._fetch(SELECT_TASK_EVENTS_AFTER, (task_id, after_id, limit))
        return [_event_from_row(r) for r in rows]

    async def count_by_state(self) -> dict[TaskState, int]:
        """How many tasks are in each state, from the committed rows."""
        rows = await self._fetch(COUNT_BY_STATE, ())
        counts = dict.fromkeys(TaskState, 0)
        for state, count in rows:
            counts[TaskState(state)] = int(count)
        return counts

    @property
    def last_event_id(self) -> int:
        """The highest event id handed out so far (committed or about to be)."""
        return self._next_event_id - 1
