"""Group commit, for any backend: one writer, whole batches, the post-commit order.

* **One writer.** Every write (a new task, a state change, an event) is appended
  to the current ``Batch`` of intents, synchronously, on the loop, and one writer
  coroutine hands whole batches to ``Backend.apply``, each one transaction.
  Callers that need durability await the batch's future; callers that do not
  (workers reporting outcomes) just append. While one batch commits the next one
  fills, so the cost of a commit is shared by everything that arrived meanwhile.
* **Ids come from the backend** at append time (``Backend.next_task_id``), so
  the caller gets its task's id with the commit future. Batches commit in order.
* **Nothing is pushed before it is stored.** After a commit the writer calls
  ``on_commit`` with what the batch made ``Durable``, synchronously, before anyone
  awaiting it resumes; then ``on_ready`` with the tasks it made ready; then the
  reads the batch carried; then the answers of conditional moves and chores.
* **A failed batch** answers its awaiting callers ``ServerBusy`` (nothing of theirs
  was written) and carries what workers reported into the next batch; the writer
  then backs off, doubling, while commits keep failing.
* **An attempt counts before it runs.** A ``started`` update is recorded at once
  by ``Backend.started`` (SQLite: the attempts journal), before the commit.

No SQL here: the backend owns it (``backend.py`` is the contract).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ..errors import ServerBusy
from ..measure import BATCH_SIZES, COMMIT_SECONDS, Histogram
from ..models import Task
from .backend import Backend, Opened
from .batching import Batching
from .intents import (
    Applied,
    Batch,
    Durable,
    ProbeWrite,
    Signals,
)

log = logging.getLogger(__name__)
#: Loop iterations between waking a batch's callers and handing the next batch to
#: the writer (the workers are fed after the first). At 64 keep-alive HTTP clients,
#: 3 made batches bigger and commits fewer: +12% requests/s against 1 or 2 (8
#: alternated runs), and loop CPU per request 103 -> 92 us; 4 and 6 measured the
#: same as 3. An idle iteration costs a few microseconds, so latency at low load
#: did not move (p50 ~0.43 ms). The next requests are read and handled in the last
#: one: the batch holds the new tasks only from then on.
GATHER_ITERATIONS = 3
#: Writes the callers of a commit must append in the one loop iteration after they
#: resume for the batch to go to the writer at once (before the workers are fed,
#: not after the gathering rounds): its commit then runs on the writer thread beside
#: the loop's work rather than after it. Such callers enqueue again as soon as they
#: resume (``await server.task()`` in a loop). HTTP handlers only answer then, and
#: requests read while the writer was busy do not count: their batches still wait
#: for the gathering (handed off early, they cost more CPU per request at 64
#: keep-alive clients).
EARLY_HAND_OFF = 64
#: After a failed commit the writer waits this long before the next one, doubling
#: up to WRITE_RETRY_CAP while commits keep failing: what a failed batch carries
#: (workers' outcomes) was retried at once, 8,000 failing commits (and logged
#: tracebacks) a second on a disk that refused every write.
WRITE_RETRY_BASE = 0.05
WRITE_RETRY_CAP = 2.0


class Engine(Batching):
    """Batches writes for ``backend`` and commits them with one writer coroutine.

    ``on_commit`` is called synchronously after every successful commit, before
    anyone awaiting the batch resumes; ``on_ready`` then gets the tasks the batch
    made ready to run; ``on_failed`` gets the new tasks of a batch that failed to
    commit (they were not written). None may block. ``clock`` gives seconds since
    the epoch (injectable for tests).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_pending_writes: int = 100_000,
        on_commit: Callable[[Durable], None] | None = None,
        on_ready: Callable[[list[Task]], None] | None = None,
        on_failed: Callable[[list[Task]], None] | None = None,
        signals: Signals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.signals = signals or Signals()
        self.signals.poke = self.poke
        backend.bind(self.signals)
        self._max_pending = max_pending_writes
        self._on_commit = on_commit or (lambda durable: None)
        self._on_ready = on_ready or (lambda tasks: None)
        self._on_failed = on_failed or (lambda tasks: None)
        self._clock = clock
        # Bound once: these run per task.
        self._task_id = backend.next_task_id
        self._event_id = backend.next_event_id
        self._encode_new = backend.encode_new
        self._encode_update = backend.encode_update
        self._started = backend.started
        self._batch: Batch | None = None
        #: The batch handed to the writer and not yet taken in by ``_committed``, with
        #: its commit (``_apply``): at most one at a time, so batches commit in order.
        self._inflight: tuple[Batch, asyncio.Future[tuple[Applied, float]]] | None = None
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
        #: The highest event id committed so far (events are committed in id order).
        self.committed_event_id = 0
        #: Of each transaction that wrote: its writes, and the seconds ``apply`` took.
        self.batch_sizes = Histogram(BATCH_SIZES)
        self.commit_seconds = Histogram(COMMIT_SECONDS)

    def __repr__(self) -> str:
        pending = len(self._batch) if self._batch else 0
        state = "closing" if self._closing else ("open" if self._writer else "closed")
        return f"<{type(self).__name__} {state} pending={pending} commits={self.commits}>"

    # --- lifecycle ----------------------------------------------------------------

    async def open(self) -> Opened:
        """Open the backend (migrating, recovering dead work), start the writer; what
        the backend found (``Opened``)."""
        opened = await self.backend.open()
        self.committed_event_id = opened.committed_event_id
        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="taskserver-store-writer")
        return opened

    async def close(self) -> None:
        """Commit whatever is pending, stop the writer and close the backend."""
        self._closing = True
        self._wake.set()
        self._retry_now.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        await self.backend.close()

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
        """A real write (``ProbeWrite``) in the next batch.

        Resolves once it committed (which clears ``write_error``), or raises
        ``ServerBusy`` if it failed. Callers asking while one is pending share it.
        """
        if self._probe is None or self._probe.done():
            self._probe = self._chore(ProbeWrite())
            self._retry_now.set()
        return self._probe

    def caught_up(self) -> asyncio.Future[None]:
        """Done once everything appended before this call has committed (or its batch
        failed: then it raises what the batch's callers got).

        The server counts a change when it appends it; a read of the rows that must
        agree with those counts (a bulk action by filter) awaits this first. Batches
        commit in order, so the current one's future is the barrier; an empty batch
        costs a round of the write loop and no write. ``ServerBusy`` once closing or
        when the writer stopped.
        """
        reason = self.cannot_write()
        if reason is not None and reason != self.write_error:
            raise ServerBusy(reason)  # closing, or no writer: the future would never resolve
        return self._current().future

    def poke(self) -> None:
        """Run a batch soon even if nothing is appended: a shared backend delivers the
        events other servers committed with it."""
        if not self._closing:
            self._current()

    @property
    def committing(self) -> int:
        """Writes in the batch being committed now; 0 while the writer is idle."""
        return len(self._inflight[0]) if self._inflight is not None else 0

    @property
    def last_event_id(self) -> int:
        """The highest event id handed out so far (committed or about to be)."""
        return self.backend.last_event_id

    # --- the writer -------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            if self._inflight is None:
                if self._batch is None:
                    if self._closing:
                        return  # everything appended before close() is committed
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                self._hand_off()
            assert self._inflight is not None
            batch, pending = self._inflight
            self._inflight = None
            try:
                applied, seconds = await pending
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
            if applied.wrote:
                self.commit_seconds.observe(seconds)
                self.batch_sizes.observe(len(batch))
            await self._committed(batch, applied)

    def _hand_off(self) -> None:
        """Start committing the current batch; appends from now on go to a new one."""
        batch = self._batch
        assert batch is not None
        assert self._inflight is None
        self._batch = None
        self._inflight = (batch, asyncio.ensure_future(self._apply(batch)))

    async def _apply(self, batch: Batch) -> tuple[Applied, float]:
        began = time.perf_counter()
        applied = await self.backend.apply(batch)
        return applied, time.perf_counter() - began

    async def _committed(self, batch: Batch, applied: Applied) -> None:
        if applied.wrote:
            self.write_error = None
        for token in batch.retire:
            self.backend.release(token)
        durable = applied.durable
        refused = applied.conflicts  # new tasks a shared database kept out were not enqueued
        durable.inserted = (
            [t for t in batch.inserted if t.id not in refused] if refused else batch.inserted
        )
        if durable.events:
            self.committed_event_id = max(self.committed_event_id, durable.events[-1].id)
        self.committed_event_id = max(self.committed_event_id, applied.committed_event_id)
        # Order matters, for speed and for correctness:
        # 1. the server's bookkeeping and the events, at once, so nothing can see
        #    this commit in the database before the server has taken it in;
        try:
            self._on_commit(durable)
        except Exception:
            log.exception("on_commit hook failed")
        # 2. wake the callers awaiting this batch, and let them run once (an HTTP
        #    caller's answer is written: its client can send the next request);
        if applied.conflicts:
            batch.future.conflicts = applied.conflicts
        gathered = len(self._batch) if self._batch is not None else 0
        batch.future.set_result(None)
        await asyncio.sleep(0)
        # 2b. a batch those callers filled at once commits from here (EARLY_HAND_OFF);
        #     its callers are answered only once this batch is fully taken in;
        if self._batch is not None and len(self._batch) - gathered >= EARLY_HAND_OFF:
            self._hand_off()
        # 3. then feed the workers: they run in the rounds below, before the next
        #    batch goes to the writer, so their outcomes join it;
        try:
            self._on_ready(durable.ready)
        except Exception:
            log.exception("on_ready hook failed")
        for (_, deliver), tasks in zip(batch.reads, applied.pages, strict=True):
            try:
                deliver(tasks)
            except Exception:
                log.exception("delivering tasks read for the scheduler failed")
        # 4. answer cancels and retries: a cancel's tombstone must still stand
        #    while on_ready offers tasks of this batch;
        for move, moved in zip(batch.moves, applied.moved, strict=True):
            move.future.set_result(moved)
        for (_, future), count in zip(batch.chores, applied.counts, strict=True):
            future.set_result(count)
        # 5. let the loop go round a few more times before the next batch goes to the
        #    writer, so what all of that provokes joins it: the next requests (read,
        #    their handlers run) and the outcomes of the tasks just fed. The writer
        #    then commits while the loop has little to do: when the tasks were fed
        #    after the hand-off, their Python held the GIL the writer takes back after
        #    every statement, and the commit took about three times its CPU.
        for _ in range(GATHER_ITERATIONS - 1):
            await asyncio.sleep(0)

    def _failed(self, batch: Batch, exc: Exception) -> None:
        """A batch did not commit: tell its callers, keep what must not be lost.

        Callers awaiting it (new tasks, published updates, cancels, purges) get
        ``ServerBusy`` (HTTP 503): nothing of theirs was written, and the server
        forgets the tasks it had counted (``on_failed``). What workers reported
        (outcomes, progress, due tasks) is carried into the next batch with its
        ids, so it is retried, not dropped. Reads are answered empty, so the
        ready queue asks again instead of waiting forever.
        """
        error = ServerBusy(f"the database refused the write: {exc}", retry_after=1.0)
        self.write_error = f"{type(exc).__name__}: {exc}"
        futures = [m.future for m in batch.moves] + [f for _, f in batch.chores]
        for future in (*futures, batch.future):
            future.set_exception(error)
            future.exception()  # workers append without awaiting: mark it seen
        new_ids = {task.id for task in batch.inserted}
        try:
            self._on_failed(batch.inserted)
        except Exception:
            log.exception("on_failed hook failed")
        for _, deliver in batch.reads:
            with contextlib.suppress(Exception):
                deliver([])
        carried = [e for e in batch.events if e.task_id is not None and e.task_id not in new_ids]
        if batch.updates or carried:
            nxt = self._current()
            nxt.updates = {**batch.updates, **nxt.updates}  # newer states win
            nxt.events = carried + nxt.events
            nxt.ready = [t for t in batch.ready if t.id not in new_ids] + nxt.ready
            nxt.delayed = nxt.delayed or batch.delayed
