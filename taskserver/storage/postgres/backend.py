"""The PostgreSQL backend: several taskserver processes, on several hosts, one database.

* **Driver: asyncpg.** It speaks the binary protocol straight from the event loop
  (no thread hop per statement) and binds arrays, so a batch of any size is one
  statement per kind of write (``unnest``): a group commit costs a handful of
  round trips, not one per task.
* **One writer connection** commits the engine's batches in order; reads use a
  small pool; one more connection listens (``LISTEN``) and holds this node's
  session lock (``node.py``).
* **Task ids** come in blocks from a sequence, handed out on the loop; run order
  is a second column, ``seq``, filled by the database at insert, so order across
  nodes is insertion order, not block order.
* **Event ids are gap-safe.** A batch takes its event ids at the very end of its
  transaction from a one-row counter (``UPDATE … SET last = last + n``), whose row
  lock is held until the commit. The next transaction to take ids waits for that
  commit, so ids become visible in id order, with no holes: a reader that sees
  id ``n`` has every id below it (a rolled-back batch gives its ids back). The
  lock is held only for the event insert and the commit itself.
* **Claims** (``claims.py``): each attempt runs on exactly one node. A ``PageQueued``
  read *claims* tasks (``FOR UPDATE SKIP LOCKED``), counting the attempt in the
  same statement; only the node that claimed a task writes its row afterwards.
* **Events cross nodes.** A commit with events ``NOTIFY``s the new last id and
  the queues it made work in (nodes with idle workers claim from them at once); a
  node where someone listens (subscribers, waiters: ``Signals.listening``) then
  reads the events after the last one it delivered and hands them to the engine,
  in id order, with its own (``Durable.events``); a node where nobody listens
  passes over them.
* **Only followers are told of events.** PostgreSQL wakes every listening session
  of the database on every ``NOTIFY``, whatever its channel, so a commit that made
  no work notifies only when another node *follows* the events: its id is in the
  event counter's ``followers``, read by the commit under the row lock it takes its
  ids with. A node follows (``follow``) before anyone there starts listening
  (``Store.follow_events``); the commits that took their ids before that waited
  for it and are at or below the id it returns, every later one notifies. It
  stops following once nobody has listened there for ``FOLLOW_GRACE`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import asyncpg

from ...errors import ConfigError, ServerBusy
from ...models import Event
from ..backend import Opened
from ..intents import Applied, Batch, Signals
from . import schema as sql
from .claims import Claims
from .node import Node, connect_error, where
from .reads import UNREACHABLE, PostgresReads
from .subscribers import SharedSubscribers
from .writes import EVENTS_CHANNEL, Writes

log = logging.getLogger(__name__)
#: Task ids reserved at a time; the next block is fetched when half is used.
ID_BLOCK = 100_000
#: Events read at most per catch-up round: a node that fell further behind (it was
#: cut off from the database a long while) skips ahead and its streams replay.
CATCHUP_LIMIT = 20_000
#: Every connection's session settings. No JIT: it compiles the driver's first type
#: look-up of a connection (array parameters) for most of a second, and the short
#: statements here never gain from it.
SESSION = {"jit": "off"}
#: Cancel requests, to every node (payload: the task id).
CANCEL_CHANNEL = "taskserver_cancel"
#: Seconds a node keeps following the events after the last listener there went (a
#: client that reconnects at once is not announced again).
FOLLOW_GRACE = 10.0


class PostgresBackend(PostgresReads):
    """Tasks and events in one PostgreSQL database shared by any number of servers."""

    #: Several servers share this database: the runtime claims instead of offering.
    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        node: str | None = None,
        lease: float = 30.0,
        clock: Callable[[], float] = time.time,
        pool_size: int = 4,
    ) -> None:
        self.dsn = dsn
        self.node = node or f"{socket.gethostname()}:{os.getpid()}"
        self.lease = lease
        self._clock = clock
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._writer: asyncpg.Connection | None = None
        self._node: Node | None = None
        self._claims = Claims(self.node, clock)
        self._writes = Writes(self.node, self._claims, lease)
        self._ids: list[tuple[int, int]] = []  # reserved blocks: (next id, end)
        self._refill: asyncio.Task[None] | None = None
        self._next_event_id = 1  # provisional ids, renumbered at commit
        #: the last event id handed to the engine (every one up to it delivered)
        self._delivered = 0
        #: the highest event id another node said it committed (``NOTIFY``)
        self._seen = 0
        #: a batch is reading other nodes' events (``_delivered`` is its to move)
        self._catching_up = False
        self._signals = Signals()
        #: the other nodes notify this one of every commit with events (see ``follow``)
        self._following = False
        self._follow_lock = asyncio.Lock()
        #: when someone last listened here (``time.monotonic``), while following
        self._listened_at = 0.0
        self._writer_pid = 0  # the server process of our writer connection
        self.commits = 0
        #: this node's Mercure subscribers, shared with the cluster (once open)
        self.subscribers: SharedSubscribers | None = None

    def __repr__(self) -> str:
        return f"<PostgresBackend node={self.node!r} delivered={self._delivered}>"

    # --- open and close ----------------------------------------------------------

    def bind(self, signals: Signals) -> None:
        """``Backend.bind``: where what the other nodes say goes."""
        self._signals = signals

    async def open(self) -> Opened:
        """``Backend.open``: connect, migrate (one node at a time), take this node's
        session lock, recover its own tasks at once, then listen for the others."""
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self._pool_size,
                command_timeout=60,
                server_settings=SESSION,
            )
            self._writer = await asyncpg.connect(self.dsn, server_settings=SESSION)
        except Exception as exc:
            await self.close()
            raise ConfigError(connect_error(self.dsn, exc)) from None
        self._writer_pid = self._writer.get_server_pid()
        self.subscribers = SharedSubscribers(self._pool, self.node, self.lease)
        self._claims.revived = self._revived
        try:
            await self._migrate(self._writer)
            self._node = Node(self.dsn, self.node, self._notified)
            await self._node.open([EVENTS_CHANNEL, CANCEL_CHANNEL])
            await self._reserve_ids()
            queued, failed = await self._recover_own()
            self._delivered = int(await self._writer.fetchval(sql.SELECT_LAST_EVENT))
            return Opened(
                counts=await self.count_by_state(),
                unique_keys={},  # the database's unique index decides, cluster-wide
                group_heads=[],  # claims decide a group's turn
                queues_with_work=await self.queues_with_work(),
                recovered_queued=queued,
                recovered_failed=failed,
                committed_event_id=self._delivered,
                paused_queues=await self.paused_queues(),
            )
        except asyncpg.PostgresError as exc:  # e.g. no right to create tables
            await self.close()
            raise ConfigError(f"PostgreSQL at {where(self.dsn)}: {exc}") from None
        except BaseException:
            await self.close()
            raise

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        # A session lock: two nodes starting at once migrate one after the other.
        await conn.execute("SELECT pg_advisory_lock($1)", sql.LOCK_MIGRATE)
        try:
            await conn.execute(sql.CREATE_VERSION_TABLE)
            version = int(await conn.fetchval(sql.SELECT_VERSION) or 0)
            if version > len(sql.MIGRATIONS):
                raise ConfigError(
                    f"the database has taskserver schema version {version}, newer than this"
                    f" taskserver knows ({len(sql.MIGRATIONS)}): upgrade taskserver"
                )
            for number, script in enumerate(sql.MIGRATIONS[version:], start=version + 1):
                async with conn.transaction():
                    await conn.execute(script)
                    await conn.execute(sql.SET_VERSION, number)
                log.info("migrated the PostgreSQL database to schema version %d", number)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", sql.LOCK_MIGRATE)

    async def close(self) -> None:
        """``Backend.close``: leave the cluster (the node row goes) and disconnect."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(BaseException):
                await self._refill
            self._refill = None
        if self.subscribers is not None:
            await self.subscribers.close()
        if self._writer is not None and not self._writer.is_closed():
            with contextlib.suppress(Exception):
                await self._writer.execute(sql.DELETE_NODE, self.node)  # its subscribers too
            with contextlib.suppress(Exception):
                await self._writer.execute(sql.UNFOLLOW, [self.node])
            self._following = False
            with contextlib.suppress(Exception):
                await self._writer.close()
        self._writer = None
        if self._node is not None:
            await self._node.close()
            self._node = None
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close()
            self._pool = None

    # --- following the events ----------------------------------------------------------

    async def follow(self) -> int:
        """Have the other nodes notify this one of every commit with events from now on
        (until ``unfollow_idle``); returns the highest event id known committed.

        Call it before someone here starts listening (``Store.follow_events``): when
        nobody listens yet, the events committed before it are passed over (as those
        notified while nobody listens), so a stream that starts after it begins at
        the cluster's last event, not at where this node last looked."""
        async with self._follow_lock:
            self._listened_at = time.monotonic()
            if self._following:
                return self.last_event_id
            alone = not self._signals.listening()
            assert self._pool is not None
            try:
                last = int(await self._pool.fetchval(sql.FOLLOW, self.node))
            except (*UNREACHABLE, asyncpg.PostgresError) as exc:
                # Nothing commits while the database is away; the cluster loop follows
                # once it is back (``unfollow_idle``), then the events come late, not lost.
                log.warning("could not follow the cluster's events: %s", exc)
                return self.last_event_id
            self._following = True
            self._seen = max(self._seen, last)
            if alone and not self._signals.listening() and not self._catching_up:
                self._delivered = max(self._delivered, last)
            else:
                self._signals.poke()  # a batch delivers what committed before
            return self.last_event_id

    async def unfollow_idle(self) -> None:
        """Stop following the events once nobody has listened here for ``FOLLOW_GRACE``
        seconds; follow (late) when someone listens who came without ``follow``.
        Called now and then (the cluster loop)."""
        if self._signals.listening():
            if not self._following:
                await self.follow()
            self._listened_at = time.monotonic()
            return
        if not self._following or time.monotonic() - self._listened_at < FOLLOW_GRACE:
            return
        async with self._follow_lock:
            if self._signals.listening() or not self._following:
                return
            assert self._pool is not None
            await self._pool.execute(sql.UNFOLLOW, [self.node])
            self._following = False

    def _revived(self) -> None:
        """The cluster had given this node up for dead and deleted what went with it:
        its subscribers' rows are written again, and it follows the events again (the
        cluster loop's ``unfollow_idle``) if someone here listens."""
        if self.subscribers is not None:
            self.subscribers.rewrite()
        self._following = False

    @property
    def delivered(self) -> int:
        """The last event id handed to the engine or passed over (all below it too)."""
        return self._delivered

    def _notified(self, channel: str, payload: str, pid: int) -> None:
        # On the loop, from the listening connection.
        if channel == EVENTS_CHANNEL and pid == self._writer_pid:
            return  # our own commit: its events are delivered with it
        if channel == CANCEL_CHANNEL:
            with contextlib.suppress(ValueError):
                self._signals.cancel(int(payload))
            return
        # "<last id> <queue> ...": the queues where that commit made tasks ready ("*":
        # maybe any). An unreadable payload (or a lost connection, "") means: look anyway.
        last, *queues = payload.split(" ")
        if last.isdigit():
            seen = int(last)
        else:
            seen, queues = self._delivered + 1, ["*"]
        if queues:
            self._signals.work(None if "*" in queues else queues)
        if seen <= self._delivered:
            return
        self._seen = max(self._seen, seen)
        if self._signals.listening():
            self._signals.poke()  # a batch delivers them
        elif not self._catching_up:
            self._delivered = seen  # nobody here takes them: passed over, not read

    # --- ids and rows (on the loop) ------------------------------------------------------

    async def _reserve_ids(self) -> None:
        assert self._pool is not None
        block = int(await self._pool.fetchval("SELECT nextval('taskserver_task_blocks')"))
        self._ids.append((block * ID_BLOCK, (block + 1) * ID_BLOCK))

    def _refill_done(self, task: asyncio.Task[None]) -> None:
        self._refill = None
        if not task.cancelled() and task.exception() is not None:
            log.error("reserving task ids failed: %s", task.exception())

    def next_task_id(self) -> int:
        """``Backend.next_task_id``: from this node's reserved block; unique in the
        cluster, increasing in this process."""
        if not self._ids:
            raise ServerBusy("task ids are being reserved from the database", retry_after=1.0)
        start, end = self._ids[0]
        if start + 1 >= end:
            self._ids.pop(0)
        else:
            self._ids[0] = (start + 1, end)
        if (
            len(self._ids) < 2
            and (not self._ids or self._ids[0][1] - self._ids[0][0] < ID_BLOCK // 2)
            and self._refill is None
        ):
            self._refill = asyncio.get_running_loop().create_task(self._reserve_ids())
            self._refill.add_done_callback(self._refill_done)
        return start

    def next_event_id(self) -> int:
        """``Backend.next_event_id``: provisional, for the order within a batch; the
        commit gives the final ids (see the module docstring)."""
        event_id = self._next_event_id
        self._next_event_id = event_id + 1
        return event_id

    @property
    def last_event_id(self) -> int:
        """``Backend.last_event_id``: the highest id this node knows committed (delivered,
        or announced by another node and on its way)."""
        return max(self._delivered, self._seen)

    encode_new = staticmethod(sql.insert_row)
    encode_update = staticmethod(sql.update_row)

    def started(self, task_id: int, attempt: int, event_id: int) -> int | None:
        """``Backend.started``: nothing to do, the claim committed the attempt."""
        return None

    def release(self, token: int) -> None:
        """``Backend.release``."""

    async def request_cancel(self, task_id: int) -> None:
        """``Backend.request_cancel``: a notification every node (this one too) hears."""
        assert self._pool is not None
        await self._pool.execute(sql.NOTIFY, CANCEL_CHANNEL, str(task_id))

    # --- the one write -------------------------------------------------------------------

    async def _connection(self) -> asyncpg.Connection:
        # The writer reconnects after the database went away (the engine retries).
        if self._writer is None or self._writer.is_closed():
            try:
                self._writer = await asyncpg.connect(self.dsn, server_settings=SESSION)
            except Exception as exc:
                raise ServerBusy(connect_error(self.dsn, exc), retry_after=1.0) from None
            self._writer_pid = self._writer.get_server_pid()
        return self._writer

    async def apply(self, batch: Batch) -> Applied:
        """``Backend.apply``: the batch's writes, then its reads (claims, promotions), in
        one transaction (one commit to wait for), its event ids taken last; then the
        events other nodes committed before it."""
        conn = await self._connection()
        now = self._clock()
        applied = Applied()
        mine: list[Event] = []
        try:
            writes = batch.writes()
            if writes or batch.reads:
                # Read committed, whatever the database's default: statements after a wait
                # must see what committed meanwhile (``Writes.write``: unique_for).
                async with conn.transaction(isolation="read_committed"):
                    events = await self._writes.write(conn, batch, now, applied) if writes else []
                    for read, _ in batch.reads:
                        tasks, made = await self._claims.answer(conn, read, now)
                        applied.pages.append(tasks)
                        events.extend(made)
                    if events:
                        mine = await self._writes.store_events(conn, events, now)
                applied.wrote = writes
                self.commits += 1
            durable = applied.durable
            durable.events = await self._catch_up(conn, mine)
            refused = applied.conflicts
            durable.ready = (
                [t for t in batch.ready if t.id not in refused] if refused else batch.ready
            )
            durable.delayed = batch.delayed
            if durable.events:
                self._delivered = max(self._delivered, durable.events[-1].id)
            applied.committed_event_id = self._delivered
        except BaseException as exc:
            # Not closed gracefully: a session the server ended mid-reply can leave the
            # driver waiting for the rest (every later statement failing; asyncpg 0.27
            # says "cannot switch to state …; another operation is in progress", an
            # InternalClientError). A new one next, unless the server refused a
            # statement of a session that is still sound (the transaction rolled back).
            if isinstance(exc, UNREACHABLE) or not isinstance(exc, asyncpg.PostgresError):
                conn.terminate()
            raise
        return applied

    async def _catch_up(self, conn: asyncpg.Connection, mine: list[Event]) -> list[Event]:
        """Events other nodes committed since the last delivered, then ``mine``, in id
        order. Read only when someone here takes them (``Signals.listening``): the
        work they made is announced with their notifications anyway."""
        upto = mine[0].id - 1 if mine else None
        if upto is not None and upto <= self._delivered:
            return mine  # nobody committed in between
        if upto is None and self._seen <= self._delivered:
            return []  # nobody said they committed
        if not self._signals.listening():
            self._delivered = max(self._delivered, self._seen, upto or 0)
            return mine
        self._catching_up = True
        try:
            rows = await conn.fetch(sql.SELECT_EVENTS_AFTER, self._delivered, CATCHUP_LIMIT + 1)
        finally:
            self._catching_up = False
        theirs = [sql.event_from_row(r) for r in rows]
        if upto is not None:
            theirs = [e for e in theirs if e.id <= upto]
        if len(theirs) > CATCHUP_LIMIT:
            log.warning(
                "this node fell %d+ events behind the cluster: live streams skip ahead",
                CATCHUP_LIMIT,
            )
            theirs = theirs[-CATCHUP_LIMIT:]
        return theirs + mine

    async def _recover_own(self) -> tuple[int, int]:
        """Tasks this node's previous run left running: back to queued at once (its
        session lock proves that run is gone), their events stored and notified."""
        conn = self._writer
        assert conn is not None
        now = self._clock()
        async with conn.transaction():
            queued, failed, events = await self._claims.rescue(conn, [self.node], now)
            await conn.execute(sql.UPSERT_NODE, self.node, *self._claims.identity(now))
            await conn.execute(sql.DELETE_NODE_SUBSCRIBERS, [self.node])  # of its last run
            await conn.execute(sql.UNFOLLOW, [self.node])  # nobody listens here yet
            if events:
                await self._writes.store_events(conn, events, now)
        if queued or failed:
            log.warning(
                "recovered tasks this node left running: %d re-queued, %d failed"
                " (no attempts left)",
                queued,
                failed,
            )
        return queued, failed
