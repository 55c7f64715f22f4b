"""Durable storage in SQLite, with group commit.

The contract, method by method, is on each method. The whole of it:

* **One writer.** Every write (a new task, a state change, an event) is appended
  to the current *batch* in memory, synchronously, and a single writer coroutine
  commits whole batches, each in one transaction. Callers that need durability
  await the batch's future; callers that do not (workers reporting outcomes)
  just append. While one batch commits the next one fills, so the cost of a
  commit is shared by everything that arrived meanwhile.
* **Ids are assigned in memory**, at append time, for tasks and events. Batches
  commit in order, so ids are committed in increasing order: once an event id is
  visible, no smaller one will ever appear (``Last-Event-ID`` replay relies on it).
  A batch that fails to commit leaves gaps, never duplicates.
* **Nothing is pushed before it is stored.** After a commit the writer calls
  ``on_commit`` with what the batch made durable, synchronously, before it
  starts the next batch; that is where the server feeds the ready queue and the hub.
* **An attempt counts before it runs.** A ``started`` update is also recorded
  at once in the attempts journal (``attempts.py``), which outlives the
  process; ``open`` folds the starts that never committed into their tasks.
* **Reads that must be ordered with writes** (paging queued tasks into memory,
  finding due tasks, conditional cancels and retries, purges) run inside the
  writer; plain queries use a second, read-only connection so they never wait
  behind a commit (WAL).

Only this module and ``schema.py`` know SQL. A PostgreSQL store would implement
the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiosqlite

from . import lifecycle
from . import schema as sql
from .attempts import SEGMENT_RECORDS, AttemptJournal
from .errors import NotSerializable, ServerBusy
from .lifecycle import TERMINAL
from .models import Event, EventType, Task, TaskState

log = logging.getLogger(__name__)
T = TypeVar("T")
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
#: Loop iterations between waking a batch's callers and handing the next batch to
#: the writer. At 64 keep-alive HTTP clients, 3 made batches bigger and commits
#: fewer: +12% requests/s against 1 or 2 (8 alternated runs), and loop CPU per
#: request 103 -> 92 us; 4 and 6 measured the same as 3. An idle iteration costs
#: a few microseconds, so latency at low load did not move (p50 ~0.43 ms).
GATHER_ITERATIONS = 3
#: After a failed commit the writer waits this long before the next one, doubling
#: up to WRITE_RETRY_CAP while commits keep failing: what a failed batch carries
#: (workers' outcomes) was retried at once, 8,000 failing commits (and logged
#: tracebacks) a second on a disk that refused every write.
WRITE_RETRY_BASE = 0.05
WRITE_RETRY_CAP = 2.0

Deliver = Callable[[list[Task]], None]


class Commit(asyncio.Future[T]):
    """A future the store resolves at a commit; awaiting callers share it.

    It refuses ``cancel()``: one caller giving up (a client disconnect, a
    timeout) must not fail the commit for everyone in the batch, and the write
    happens anyway. A task cancelled while it awaits one gets its
    ``CancelledError`` once the commit is done. This replaces an
    ``asyncio.shield`` per caller, which cost a future and a callback per task.
    """

    def cancel(self, msg: Any | None = None) -> bool:
        return False


@dataclass(slots=True)
class Committed:
    """What one batch made durable, handed to ``on_commit`` in commit order."""

    #: Tasks that became ``queued`` (new, due, retried by the worker): offer them.
    ready: list[Task]
    events: list[Event]
    #: new tasks that are not ready yet (delayed): the scheduler may need to wake.
    delayed: bool


@dataclass(slots=True)
class _Outcome:
    """What the writer thread did with a batch (the loop resolves the futures)."""

    committed: Committed = field(default_factory=lambda: Committed([], [], False))
    #: per conditional: the state it moved the task from, or None when it did not
    changed: list[TaskState | None] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    pages: list[list[Task]] = field(default_factory=list)
    #: a transaction with writes committed (a batch of reads only proves nothing)
    wrote: bool = False


@dataclass(slots=True)
class _Conditional:
    sql: str
    params: tuple[Any, ...]
    task_id: int
    event_id: int
    state: TaskState
    type: EventType
    extra: dict[str, Any] | None
    future: asyncio.Future[TaskState | None]


@dataclass(slots=True)
class _Exec:
    statements: list[tuple[str, tuple[Any, ...]]]
    future: asyncio.Future[int]
    #: resolve to the sum of all rows changed (else: those of the last statement)
    total: bool = False


@dataclass(slots=True)
class _Page:
    sql: str
    params: tuple[Any, ...]
    deliver: Deliver


@dataclass(slots=True)
class _Batch:
    future: asyncio.Future[None]
    inserts: list[tuple[Any, ...]] = field(default_factory=list)
    inserted: list[Task] = field(default_factory=list)
    ready: list[Task] = field(default_factory=list)
    # One full-row write per task; a later state of the same task replaces an earlier one.
    updates: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    statements: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    conditionals: list[_Conditional] = field(default_factory=list)
    execs: list[_Exec] = field(default_factory=list)
    pages: list[_Page] = field(default_factory=list)
    delayed: bool = False
    #: after the commit, the attempts journal segments to free (every start in them committed)
    retire: list[int] = field(default_factory=list)
    #: after the commit, the writer copies what is left of the WAL (see WAL_LIMIT_PAGES)
    checkpoint: bool = False

    def __len__(self) -> int:
        return len(self.inserts) + len(self.updates) + len(self.events)


@dataclass(slots=True)
class NewTask:
    """A validated task to insert: JSON text of its data and everything resolved."""

    text: str
    data: Any
    max_attempts: int
    timeout: float | None
    queue: str = "default"
    priority: int = 0
    available_at: float | None = None
    name: str | None = None
    serial_group: str | None = None
    unique_key: str | None = None
    retry: Any = None
    #: not stored: how long a succeeded task with the same key still counts (s)
    unique_for: float | None = None


class Store:
    """SQLite storage for tasks and events, written by one group-committing coroutine.

    ``on_commit`` is called synchronously after every successful commit, before
    anyone awaiting the batch resumes; ``on_ready`` then gets the tasks the batch
    made ready to run; ``on_failed`` gets the new tasks of a batch that failed to
    commit (they were not written). None may block. ``clock`` gives seconds since the epoch
    (injectable for tests).
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "NORMAL",
        max_pending_writes: int = 100_000,
        wal_limit_pages: int = WAL_LIMIT_PAGES,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        journal_segment: int = SEGMENT_RECORDS,
        on_commit: Callable[[Committed], None] | None = None,
        on_ready: Callable[[list[Task]], None] | None = None,
        on_failed: Callable[[list[Task]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._synchronous = synchronous
        self._wal_limit = wal_limit_pages
        self._checkpoint_interval = checkpoint_interval
        self._max_pending = max_pending_writes
        self._on_commit = on_commit or (lambda committed: None)
        self._on_ready = on_ready or (lambda tasks: None)
        self._on_failed = on_failed or (lambda tasks: None)
        self._clock = clock
        #: Start markers that outlive the process (see attempts.py); none in memory.
        self.journal = (
            None if path == ":memory:" else AttemptJournal(path, segment_records=journal_segment)
        )
        # The writer's connection is used only on the writer thread, so one batch is
        # one thread hop (aiosqlite would hop once per statement; on a busy loop
        # every hop waits for a loop iteration). Reads use aiosqlite.
        self._conn: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._next_task_id = 1
        self._next_event_id = 1
        self._batch: _Batch | None = None
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self.commits = 0
        #: Transactions that failed (and were rolled back), and how many in a row now.
        self.failed_commits = 0
        self._failing = 0
        self._retry_now = asyncio.Event()
        #: Why the last write failed (``None`` once a write commits): see ``cannot_write``.
        self.write_error: str | None = None
        self._probe: asyncio.Future[int] | None = None
        #: Times the writer copied the whole WAL so that it starts over (WAL_LIMIT_PAGES).
        self.wal_restarts = 0
        #: The highest event id committed so far (events are committed in id order).
        self.committed_event_id = 0
        #: What ``open`` found left running by a dead process.
        self.recovered_queued = 0
        self.recovered_failed = 0

    def __repr__(self) -> str:
        pending = len(self._batch) if self._batch else 0
        state = "closing" if self._closing else ("open" if self._conn else "closed")
        return f"<Store {self.path!r} {state} pending={pending} commits={self.commits}>"

    # --- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Connect, migrate, load the id counters, recover dead work and start the writer."""
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="taskserver-writer")
        await self._in_writer(self._open_sync)
        if self.path != ":memory:":  # a second connection to :memory: is another database
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (*sql.PRAGMAS, "PRAGMA query_only = 1"):
                await self._reader.execute(pragma)
            self._checkpointer = await aiosqlite.connect(self.path, isolation_level=None)
            await self._checkpointer.execute("PRAGMA busy_timeout = 5000")
            self._checkpoints = asyncio.create_task(
                self._checkpoint_loop(), name="taskserver-store-checkpoint"
            )
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="taskserver-store-writer")

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
                if row is not None and row[1] > self._wal_limit and not self._closing:
                    self._current().checkpoint = True

    async def _in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open_sync(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in (*sql.PRAGMAS, f"PRAGMA synchronous = {self._synchronous}"):
            conn.execute(pragma)
        if self.path != ":memory:":
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # _checkpoint_loop does it
            # When the WAL starts over, a file grown past this is cut back to it.
            conn.execute(f"PRAGMA journal_size_limit = {self._wal_limit * 4096}")
        self._migrate(conn)
        highest = sql.SELECT_HIGHEST_ID
        self._next_task_id = int(conn.execute(highest.format(table="tasks")).fetchone()[0]) + 1
        self._next_event_id = int(conn.execute(highest.format(table="events")).fetchone()[0]) + 1
        if self.journal is not None and not self.journal.lock():
            log.warning(
                "%s is used by another taskserver: attempts count only at commit here",
                self.journal.path,
            )
            self.journal = None
        self._recover(conn)
        if self.journal is not None:
            try:
                self.journal.open()  # after the recovery committed: what it held is in it
            except OSError:
                log.exception("attempts journal %s: attempts count only at commit", self.path)
                self.journal.close()
                self.journal = None
        self.committed_event_id = self._next_event_id - 1
        self._conn = conn

    async def close(self) -> None:
        """Commit whatever is pending, stop the writer and close the connections."""
        self._closing = True
        self._wake.set()
        self._retry_now.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
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
            self._thread.shutdown()
            self._thread = None

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > len(sql.MIGRATIONS):
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this taskserver knows "
                f"({len(sql.MIGRATIONS)}); upgrade taskserver"
            )
        for number, script in enumerate(sql.MIGRATIONS[version:], start=version + 1):
            db.execute("BEGIN IMMEDIATE")
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
            db.execute("COMMIT")
            log.info("migrated %s to schema version %d", self.path, number)

    def _recover(self, db: sqlite3.Connection) -> None:
        """Return tasks a dead process left running to ``queued``; fail those out of attempts.

        Left running: a task whose ``running`` row committed, and a ``queued`` one
        whose start is in the attempts journal with a ``started`` event that never
        committed (the process died within the commit window). Either way the
        attempt counts, so a task that kills the process every time ends ``failed``
        after ``max_attempts``. Runs in ``open`` before the writer starts, in one
        transaction with its events; the caller empties the journal after it.
        """
        rows: list[tuple[int, int, int]] = db.execute(sql.SELECT_RUNNING).fetchall()
        if self.journal is not None:
            committed = self._next_event_id - 1  # event ids commit in order
            started: dict[int, int] = {}
            for task_id, attempt, event_id in self.journal.read():
                if event_id > committed:
                    started[task_id] = max(attempt, started.get(task_id, 0))
            if started:
                queued = db.execute(sql.SELECT_QUEUED_BY_IDS, (sql.dumps(list(started)),))
                rows += [
                    (task_id, started[task_id], max_attempts)
                    for task_id, attempts, max_attempts in queued
                    if attempts < started[task_id]
                ]
        if not rows:
            return
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        extra: dict[str, Any]
        for task_id, attempts, max_attempts in rows:
            state = lifecycle.recovered_state(attempts, max_attempts)
            out_of_attempts = state is lifecycle.FAILED
            stub = Task(
                id=task_id,
                data=None,
                max_attempts=max_attempts,
                timeout=None,
                state=state,
                created_at=now,
                updated_at=now,
                attempts=attempts,
            )
            if out_of_attempts:
                self.recovered_failed += 1
                error = (
                    f"the server process died during attempt {attempts} of {max_attempts}"
                    " (killed or crashed); no attempts are left"
                )
                db.execute(sql.RECOVER_FAILED, (attempts, error, now, now, task_id))
                type_, extra = EventType.FAILED, {"error": error}
            else:
                self.recovered_queued += 1
                db.execute(sql.RECOVER_QUEUED, (attempts, now, now, task_id))
                type_, extra = EventType.QUEUED, {"recovered": True}
            event = Event(
                self._next_event_id, task_id, type_, sql.event_json(stub, type_, extra, now)
            )
            db.execute(sql.INSERT_EVENT, sql.event_row(event, now))
            self._next_event_id += 1
        db.execute("COMMIT")
        log.warning(
            "recovered tasks left running: %d re-queued, %d failed (no attempts left)",
            self.recovered_queued,
            self.recovered_failed,
        )

    # --- group-committed writes ----------------------------------------------

    def _current(self) -> _Batch:
        if self._batch is None:
            self._batch = _Batch(future=Commit(loop=asyncio.get_running_loop()))
            self._wake.set()
        return self._batch

    def _check_room(self, extra: int) -> _Batch:
        if self._closing:
            raise ServerBusy("the store is closing")
        batch = self._current()
        if len(batch) + extra > self._max_pending:
            raise ServerBusy("too many writes are waiting for the disk", retry_after=1.0)
        return batch

    def _new_event(
        self,
        batch: _Batch,
        task: Task,
        type_: EventType,
        extra: dict[str, Any] | None,
        now: float,
        result: str | None = None,
    ) -> None:
        json = sql.event_json(task, type_, extra, now, result=result)
        batch.events.append(Event(self._next_event_id, task.id, type_, json))
        self._next_event_id += 1

    def insert_tasks(
        self, items: Sequence[NewTask], *, schedule: tuple[str, float] | None = None
    ) -> tuple[list[Task], asyncio.Future[None]]:
        """Append new tasks and their events to the current batch; all commit together.

        A task whose ``available_at`` is in the future starts ``waiting``, else
        ``queued``. ``schedule`` = ``(name, due)`` records in the same transaction
        that a periodic schedule has enqueued its run for ``due``. Returns the
        tasks (ids assigned, increasing) and the batch future, done at commit.
        Raises ``ServerBusy`` when the batch is full; then nothing was appended.
        """
        batch = self._check_room(2 * len(items))
        now = self._clock()
        tasks = [self._add_task(batch, item, item.text, item.data, now) for item in items]
        if schedule is not None:
            batch.statements.append((sql.UPSERT_SCHEDULE, schedule))
        return tasks, batch.future

    def insert_task(
        self, options: NewTask, text: str, data: Any
    ) -> tuple[Task, asyncio.Future[None]]:
        """``insert_tasks`` of one task: ``options``' resolved options with this data.

        ``text`` is the data's JSON; ``options.text`` and ``options.data`` are not
        used, so one resolved ``NewTask`` serves every task with the same options.
        """
        batch = self._check_room(2)
        return self._add_task(batch, options, text, data, self._clock()), batch.future

    def _add_task(self, batch: _Batch, item: NewTask, text: str, data: Any, now: float) -> Task:
        due = now if item.available_at is None else item.available_at
        # Positional: a dataclass takes them faster than keywords (this runs per task).
        task = Task(
            self._next_task_id,
            data,
            lifecycle.initial_state(due, now),
            item.max_attempts,
            item.timeout,
            now,
            now,
            item.queue,
            item.priority,
            due,
            item.name,
            item.serial_group,
            item.unique_key,
            item.retry,
        )
        self._next_task_id += 1
        batch.inserts.append(sql.insert_row(task, text))
        batch.inserted.append(task)
        if task.state is lifecycle.QUEUED:
            batch.ready.append(task)
            self._new_event(batch, task, EventType.QUEUED, None, now)
        else:
            batch.delayed = True
            self._new_event(batch, task, EventType.QUEUED, {"available_at": due}, now)
        return task

    def update_task(
        self,
        task: Task,
        type_: EventType,
        extra: dict[str, Any] | None = None,
        *,
        ready: bool = False,
    ) -> asyncio.Future[None]:
        """Write ``task``'s current state as a whole row, with an event, in the current batch.

        The caller owns ``task`` (a worker while it runs, the ready queue while it
        waits), so a full-row write cannot undo someone else's change. A task
        that succeeded has its ``result`` encoded here: ``NotSerializable`` is raised
        (and nothing appended) when it cannot be. ``ready`` hands the task to
        ``on_commit`` as ready to run. Never refused: outcomes of running work
        must not be lost. The returned future is the batch's, done at commit.
        A ``finished`` event carries the task's ``result`` (encoded once, for the
        row and the event), so ``extra`` must not. A ``started`` one is also in the
        attempts journal when this returns, so the attempt counts even if the
        process dies before the commit.
        """
        result = None
        if type_ is EventType.FINISHED or (
            task.state is lifecycle.SUCCEEDED and task.result is not None
        ):
            try:
                result = sql.dumps(task.result)
            except TypeError as exc:
                raise NotSerializable(
                    f"the task's result cannot be encoded as JSON: {exc}", field="result"
                ) from None
        batch = self._current()
        if type_ is EventType.STARTED and self.journal is not None:
            full = self.journal.started(task.id, task.attempts, self._next_event_id)
            if full is not None:
                batch.retire.append(full)
        now = self._clock()
        task.updated_at = now
        batch.updates[task.id] = sql.update_row(task, None if task.result is None else result)
        self._new_event(
            batch, task, type_, extra, now, result if type_ is EventType.FINISHED else None
        )
        if ready:
            batch.ready.append(task)
        elif task.state in lifecycle.DELAYED:
            batch.delayed = True
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
        replays both in order. ``uid`` need not be unique. Raises ``ServerBusy``
        when the batch is full.
        """
        batch = self._check_room(1)
        event = Event(self._next_event_id, None, type_, data, topics, private, uid, retry)
        self._next_event_id += 1
        batch.events.append(event)
        return event, batch.future

    def _conditional(
        self,
        statement: str,
        params: tuple[Any, ...],
        task_id: int,
        state: TaskState,
        type_: EventType,
        extra: dict[str, Any] | None = None,
    ) -> asyncio.Future[TaskState | None]:
        batch = self._check_room(2)
        # The event id is taken now, so ids stay in commit order; unused, it is a gap.
        op = _Conditional(
            statement,
            params,
            task_id,
            self._next_event_id,
            state,
            type_,
            extra,
            Commit(loop=asyncio.get_running_loop()),
        )
        self._next_event_id += 1
        batch.conditionals.append(op)
        return op.future

    def cancel_pending(self, task_id: int) -> asyncio.Future[TaskState | None]:
        """Cancel a task that waits on disk (queued, waiting or retrying), atomically.

        Resolves to the state it was in when this call moved it to ``cancelled``
        (its event is then committed), to
        ``None`` when it was in another state or does not exist.
        """
        now = self._clock()
        return self._conditional(
            sql.CANCEL_PENDING,
            (now, now, task_id),
            task_id,
            lifecycle.CANCELLED,
            EventType.CANCELLED,
        )

    def retry_ended(self, task_id: int) -> asyncio.Future[TaskState | None]:
        """Re-queue a failed or cancelled task with its attempts reset, atomically.

        Resolves to the state it left when it moved (its event then committed),
        else ``None``.
        """
        now = self._clock()
        return self._conditional(
            sql.RETRY_ENDED,
            (now, now, task_id),
            task_id,
            lifecycle.QUEUED,
            EventType.QUEUED,
            {"manual_retry": True},
        )

    def purge(
        self, states: Iterable[TaskState], before: float, *, chunk: int = 5_000
    ) -> asyncio.Future[int]:
        """Delete up to ``chunk`` ended tasks in ``states`` finished before ``before``.

        Their events go too. Resolves to the number of tasks deleted; call again
        until it is below ``chunk``.
        """
        names = [TaskState(s) for s in states]
        if not names or any(s not in TERMINAL for s in names):
            raise ValueError("purge only deletes ended tasks (succeeded, failed, cancelled)")
        marks = ", ".join("?" for _ in names)
        params = (*(s.value for s in names), before, chunk)
        statements = [
            (sql.PURGE_TASK_EVENTS.format(states=marks), params),
            (sql.PURGE_TASKS.format(states=marks), params),
        ]
        return self._exec(statements)

    def trim_events(
        self, *, before: float | None, keep: int | None, chunk: int = 20_000
    ) -> asyncio.Future[int]:
        """Delete up to ``chunk`` events older than ``before`` or beyond the newest ``keep``."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if before is not None:
            statements.append((sql.TRIM_EVENTS_BY_AGE, (before, chunk)))
        if keep is not None:
            statements.append((sql.TRIM_EVENTS_BY_COUNT, (self._next_event_id - 1 - keep, chunk)))
        return self._exec(statements, total=True)

    def _exec(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, total: bool = False
    ) -> asyncio.Future[int]:
        op = _Exec(statements, Commit(loop=asyncio.get_running_loop()), total)
        self._check_room(1).execs.append(op)
        return op.future

    def cannot_write(self) -> str | None:
        """Why writes cannot be expected to commit now, or ``None`` when they can.

        The store is closing, its writer has stopped, or the last transaction
        that wrote failed (``write_error``: e.g. the disk is full) and none has
        committed since. ``probe_write`` finds out whether that has passed.
        """
        if self._closing:
            return "the store is closing"
        if self._writer is None or self._writer.done():
            return "the store's writer is not running"
        return self.write_error

    def probe_write(self) -> asyncio.Future[int]:
        """A real write (the database header rewritten, unchanged) in the next batch.

        Resolves once it committed (which clears ``write_error``), or raises
        ``ServerBusy`` if it failed. Callers asking while one is pending share it.
        """
        if self._probe is None or self._probe.done():
            self._probe = self._exec([(sql.PROBE_WRITE, ())])
            self._retry_now.set()
        return self._probe

    def page_queued(self, queue: str, limit: int, busy_groups: list[str], deliver: Deliver) -> None:
        """Ask the writer for the first ``limit`` queued tasks of ``queue``, in run order,
        leaving out tasks of the serial groups in ``busy_groups``.

        ``deliver`` is called from the writer after the current batch commits and
        before the next starts, so no commit slips between query and delivery.
        It must not block.
        """
        params = (queue, sql.dumps(busy_groups), limit)
        self._current().pages.append(_Page(sql.SELECT_QUEUED_PAGE, params, deliver))

    def group_head(self, group: str, deliver: Deliver) -> None:
        """Ask the writer for the oldest task of serial group ``group`` that has not ended
        (queued, waiting or retrying); ``deliver`` gets a list of at most one."""
        self._current().pages.append(_Page(sql.SELECT_GROUP_HEAD, (group,), deliver))

    def due_tasks(self, now: float, limit: int, deliver: Deliver) -> None:
        """Ask the writer for up to ``limit`` waiting/retrying tasks due by ``now``.

        ``deliver`` gets them as the writer sees them, and may append updates
        (which land in the next batch, with ids in order).
        """
        self._current().pages.append(_Page(sql.SELECT_DUE, (now, limit), deliver))

    async def _write_loop(self) -> None:
        while True:
            batch = self._batch
            if batch is None:
                if self._closing:
                    return  # everything appended before close() is committed
                await self._wake.wait()
                self._wake.clear()
                continue
            self._batch = None
            try:
                outcome = await self._in_writer(self._commit_sync, batch)
            except Exception as exc:
                self.failed_commits += 1
                self._failing += 1
                if self._failing == 1:
                    log.exception("commit of %d writes failed", len(batch))
                else:
                    log.error("commit of %d writes failed again: %s", len(batch), exc)
                self._failed(batch, exc)
                delay = min(WRITE_RETRY_CAP, WRITE_RETRY_BASE * 2 ** (self._failing - 1))
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):  # a probe_write or close() cuts it short
                    await asyncio.wait_for(self._retry_now.wait(), delay)
                continue
            self._failing = 0
            self.commits += 1
            if outcome.wrote:
                self.write_error = None
            if batch.retire and self.journal is not None:
                for segment in batch.retire:
                    self.journal.retire(segment)
            if outcome.committed.events:
                self.committed_event_id = max(
                    self.committed_event_id, outcome.committed.events[-1].id
                )
            # Order matters, for speed and for correctness:
            # 1. the server's bookkeeping and the events, at once, so nothing can see
            #    this commit in the database before the server has taken it in;
            try:
                self._on_commit(outcome.committed)
            except Exception:
                log.exception("on_commit hook failed")
            # 2. wake the callers awaiting this batch and let the loop go round a few
            #    times before the next batch goes to the writer, so what the answers
            #    provoke joins it: a producer's next task, and an HTTP client's next
            #    request (its answer is written, the request read, its handler run);
            batch.future.set_result(None)
            for _ in range(GATHER_ITERATIONS):
                await asyncio.sleep(0)
            # 3. then feed the workers: they run while the writer thread commits the
            #    next batch (the two overlap);
            try:
                self._on_ready(outcome.committed.ready)
            except Exception:
                log.exception("on_ready hook failed")
            for page, tasks in zip(batch.pages, outcome.pages, strict=True):
                try:
                    page.deliver(tasks)
                except Exception:
                    log.exception("delivering tasks read for the scheduler failed")
            # 4. answer cancels and retries last: a cancel's tombstone must still
            #    stand while on_ready offers tasks of this batch.
            for cond, changed in zip(batch.conditionals, outcome.changed, strict=True):
                cond.future.set_result(changed)
            for ex, count in zip(batch.execs, outcome.counts, strict=True):
                ex.future.set_result(count)

    def _failed(self, batch: _Batch, exc: Exception) -> None:
        """A batch did not commit: tell its callers, keep what must not be lost.

        Callers awaiting it (new tasks, published updates, cancels, purges) get
        ``ServerBusy`` (HTTP 503): nothing of theirs was written, and the server
        forgets the tasks it had counted (``on_failed``). What workers reported
        (outcomes, progress, due tasks) is carried into the next batch with its
        ids, so it is retried, not dropped. Pages are answered empty, so the
        ready queue asks again instead of waiting forever.
        """
        error = ServerBusy(f"the database refused the write: {exc}", retry_after=1.0)
        self.write_error = f"{type(exc).__name__}: {exc}"
        for cond in batch.conditionals:
            cond.future.set_exception(error)
            cond.future.exception()
        for ex in batch.execs:
            ex.future.set_exception(error)
            ex.future.exception()
        batch.future.set_exception(error)
        batch.future.exception()  # workers append without awaiting: mark it seen
        new_ids = {row[0] for row in batch.inserts}
        try:
            self._on_failed(batch.inserted)
        except Exception:
            log.exception("on_failed hook failed")
        for page in batch.pages:
            with contextlib.suppress(Exception):
                page.deliver([])
        carried = [e for e in batch.events if e.task_id is not None and e.task_id not in new_ids]
        if batch.retire:  # its starts are carried: free the segments after they commit
            self._current().retire += batch.retire
        if batch.updates or carried:
            nxt = self._current()
            nxt.updates = {**batch.updates, **nxt.updates}  # newer states win
            nxt.events = carried + nxt.events
            nxt.ready = [t for t in batch.ready if t.id not in new_ids] + nxt.ready
            nxt.delayed = nxt.delayed or batch.delayed

    def _write(self, batch: _Batch, db: sqlite3.Connection, now: float, outcome: _Outcome) -> None:
        """On the writer thread: the batch's writes in one transaction (caller rolls back)."""
        db.execute("BEGIN IMMEDIATE")
        for statement, values in sql.insert_many(
            sql.INSERT_TASK_PREFIX, sql.TASK_ROW, batch.inserts
        ):
            db.execute(statement, values)
        for statement, values in sql.update_many(list(batch.updates.values())):
            db.execute(statement, values)
        for statement, params in batch.statements:
            db.execute(statement, params)
        events = batch.events
        for op in batch.conditionals:
            # The state before, for the server's counters: it may have moved since
            # the caller looked (queued -> running -> retrying ...).
            before = db.execute(sql.SELECT_STATE, (op.task_id,)).fetchone()
            changed = db.execute(op.sql, op.params).rowcount == 1
            outcome.changed.append(TaskState(before[0]) if changed and before else None)
            if changed:
                stub = Task(
                    id=op.task_id,
                    data=None,
                    state=op.state,
                    max_attempts=1,
                    timeout=None,
                    created_at=now,
                    updated_at=now,
                )
                events.append(
                    Event(
                        op.event_id,
                        op.task_id,
                        op.type,
                        sql.event_json(stub, op.type, op.extra, now),
                    )
                )
        for ex in batch.execs:
            counts = [max(0, db.execute(q, params).rowcount) for q, params in ex.statements]
            outcome.counts.append(sum(counts) if ex.total else counts[-1] if counts else 0)
        if events:
            if batch.conditionals:  # their events were appended here, with earlier ids
                events.sort(key=lambda e: e.id)
            task_rows = [
                (e.id, e.task_id, e.type, e.json, now) for e in events if e.task_id is not None
            ]
            insert = sql.insert_many(sql.INSERT_TASK_EVENT_PREFIX, sql.TASK_EVENT_ROW, task_rows)
            if len(task_rows) < len(events):  # updates published to the hub, no task
                rows = [sql.event_row(e, now) for e in events if e.task_id is None]
                insert += sql.insert_many(sql.INSERT_EVENT_PREFIX, sql.EVENT_ROW, rows)
            for statement, values in insert:
                db.execute(statement, values)
        db.execute("COMMIT")

    def _commit_sync(self, batch: _Batch) -> _Outcome:
        # On the writer thread: the whole batch, one transaction, then the reads
        # the batch asked for (so they see exactly what on_commit will reflect).
        db = self._conn
        assert db is not None
        now = self._clock()
        outcome = _Outcome()
        writes = (
            batch.inserts
            or batch.updates
            or batch.statements
            or batch.events
            or batch.conditionals
            or batch.execs
        )
        try:
            if writes:  # a batch of reads only (pages) needs no transaction
                self._write(batch, db, now, outcome)
                outcome.wrote = True
        except BaseException:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            raise
        if batch.checkpoint:
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
        outcome.committed.ready = batch.ready
        outcome.committed.events = batch.events
        outcome.committed.delayed = batch.delayed
        for page in batch.pages:
            try:
                rows = db.execute(page.sql, page.params).fetchall()
                outcome.pages.append([sql.task_from_row(r) for r in rows])
            except Exception:
                log.exception("reading tasks for the scheduler failed")
                outcome.pages.append([])
        return outcome

    # --- reads ----------------------------------------------------------------

    async def _fetch(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if self._reader is None:  # :memory: — the writer's connection is the only one

            def read() -> list[Any]:
                assert self._conn is not None
                return self._conn.execute(query, params).fetchall()

            return list(await self._in_writer(read))
        return list(await self._reader.execute_fetchall(query, params))

    async def get_task(self, task_id: int) -> Task | None:
        """The committed state of one task, or ``None``."""
        rows = await self._fetch(sql.SELECT_TASK, (task_id,))
        return sql.task_from_row(rows[0]) if rows else None

    async def list_tasks(
        self, *, state: TaskState | None, after: int, limit: int, before: int | None = None
    ) -> list[Task]:
        """Up to ``limit`` committed tasks: ids above ``after`` in id order, or, with
        ``before``, ids below it newest first."""
        if before is not None:
            if state is None:
                rows = await self._fetch(sql.SELECT_TASKS_DESC, (before, limit))
            else:
                rows = await self._fetch(sql.SELECT_TASKS_BY_STATE_DESC, (state, before, limit))
        elif state is None:
            rows = await self._fetch(sql.SELECT_TASKS, (after, limit))
        else:
            rows = await self._fetch(sql.SELECT_TASKS_BY_STATE, (state, after, limit))
        return [sql.task_from_row(r) for r in rows]

    async def ids_in_state(self, state: TaskState, limit: int) -> list[int]:
        """Up to ``limit`` ids of committed tasks in ``state``, oldest first."""
        return [int(r[0]) for r in await self._fetch(sql.SELECT_IDS_BY_STATE, (state.value, limit))]

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        """Up to ``limit`` committed events with ids above ``after_id``, in id order.

        ``task_id`` keeps one task's events; ``tasks_only`` drops published updates.
        """
        if task_id is not None:
            rows = await self._fetch(sql.SELECT_TASK_EVENTS_AFTER, (task_id, after_id, limit))
        else:
            query = sql.SELECT_ALL_TASK_EVENTS_AFTER if tasks_only else sql.SELECT_EVENTS_AFTER
            rows = await self._fetch(query, (after_id, limit))
        return [sql.event_from_row(r) for r in rows]

    async def find_event(self, uid: str) -> int | None:
        """The sequence number of the first stored event with publisher id ``uid``, or
        ``None`` (a publisher may reuse an id: replay after its first use misses nothing)."""
        rows = await self._fetch(sql.SELECT_EVENT_BY_UID, (uid,))
        return int(rows[0][0]) if rows else None

    async def count_by_state(self) -> dict[TaskState, int]:
        """How many tasks are in each state, from the committed rows."""
        counts = dict.fromkeys(TaskState, 0)
        for state, count in await self._fetch(sql.COUNT_BY_STATE):
            counts[TaskState(state)] = int(count)
        return counts

    async def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        """Active tasks per queue and state."""
        counts: dict[str, dict[TaskState, int]] = {}
        for queue, state, count in await self._fetch(sql.COUNT_BY_QUEUE):
            counts.setdefault(queue, {})[TaskState(state)] = int(count)
        return counts

    async def queues_with_work(self) -> list[str]:
        """Names of queues that have queued tasks on disk."""
        return [str(r[0]) for r in await self._fetch(sql.SELECT_QUEUES_WITH_WORK)]

    async def next_due(self) -> float | None:
        """The earliest ``available_at`` of a waiting or retrying task, or ``None``."""
        rows = await self._fetch(sql.SELECT_NEXT_DUE)
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    async def active_unique_keys(self) -> dict[str, int]:
        """``unique_key -> id`` of every task that has not ended."""
        return {str(k): int(i) for k, i in await self._fetch(sql.SELECT_ACTIVE_UNIQUE)}

    async def recent_unique(self, key: str, since: float) -> int | None:
        """The newest task with ``key`` that succeeded at or after ``since``."""
        rows = await self._fetch(sql.SELECT_RECENT_UNIQUE, (key, since))
        return int(rows[0][0]) if rows else None

    async def serial_heads(self) -> list[tuple[str, int, TaskState]]:
        """Per serial group with tasks that have not ended: its oldest one and that one's state."""
        rows = await self._fetch(sql.SELECT_GROUP_HEADS)
        return [(str(g), int(i), TaskState(state)) for g, i, state in rows]

    async def schedules(self) -> dict[str, float]:
        """``name -> last due time enqueued`` of every periodic schedule."""
        return {str(n): float(d) for n, d in await self._fetch(sql.SELECT_SCHEDULES)}

    @property
    def last_event_id(self) -> int:
        """The highest event id handed out so far (committed or about to be)."""
        return self._next_event_id - 1


class SnapshotError(Exception):
    """The database file exists but cannot be opened for reading (the driver's message)."""


class Snapshot:
    """Read-only, synchronous access to a taskserver database, for the admin commands.

    Opens the file read-only (it is never created or migrated), so it is safe
    beside a running server: WAL lets it read while the server writes.
    """

    def __init__(self, path: str) -> None:
        from pathlib import Path

        if not Path(path).is_file():
            raise FileNotFoundError(f"no database at {path}")
        try:
            self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            self._conn.execute("PRAGMA busy_timeout = 5000")
        except sqlite3.Error as exc:
            raise SnapshotError(str(exc)) from exc

    def close(self) -> None:
        self._conn.close()

    def get_task(self, task_id: int) -> Task | None:
        row = self._conn.execute(sql.SELECT_TASK, (task_id,)).fetchone()
        return sql.task_from_row(row) if row else None

    def list_tasks(self, *, state: TaskState | None, after: int, limit: int) -> list[Task]:
        if state is None:
            rows = self._conn.execute(sql.SELECT_TASKS, (after, limit)).fetchall()
        else:
            rows = self._conn.execute(sql.SELECT_TASKS_BY_STATE, (state, after, limit)).fetchall()
        return [sql.task_from_row(r) for r in rows]

    def count_by_state(self) -> dict[TaskState, int]:
        counts = dict.fromkeys(TaskState, 0)
        for state, count in self._conn.execute(sql.COUNT_BY_STATE):
            counts[TaskState(state)] = int(count)
        return counts

    def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        counts: dict[str, dict[TaskState, int]] = {}
        for queue, state, count in self._conn.execute(sql.COUNT_BY_QUEUE):
            counts.setdefault(queue, {})[TaskState(state)] = int(count)
        return counts
