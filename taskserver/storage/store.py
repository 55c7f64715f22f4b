"""``Store``: the group-commit engine over the backend a database address names.

The server and the tests use this; the backend behind it is chosen by ``path``:
a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file or ``:memory:``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..models import Event, Task, TaskState
from .backend import Backend, Opened
from .engine import Engine
from .intents import Durable, Signals
from .postgres import PostgresBackend
from .postgres.subscribers import SharedSubscribers
from .sqlite import SqliteBackend
from .sqlite.attempts import SEGMENT_RECORDS, AttemptJournal
from .sqlite.backend import CHECKPOINT_INTERVAL, WAL_LIMIT_PAGES


def is_postgres(address: str) -> bool:
    """Whether a ``--db`` address names a PostgreSQL database (else a SQLite file)."""
    return address.startswith(("postgresql://", "postgres://"))


class Store(Engine):
    """An ``Engine`` over the backend ``path`` names, with the backend's reads at hand.

    Every read is of committed state (see ``Backend``); ``open`` returns ``Opened``.
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
        on_commit: Callable[[Durable], None] | None = None,
        on_ready: Callable[[list[Task]], None] | None = None,
        on_failed: Callable[[list[Task]], None] | None = None,
        signals: Signals | None = None,
        node: str | None = None,
        lease: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        backend: Backend
        self._sqlite: SqliteBackend | None = None
        if is_postgres(path):
            backend = PostgresBackend(path, node=node, lease=lease, clock=clock)
        else:
            backend = self._sqlite = SqliteBackend(
                path,
                synchronous=synchronous,
                wal_limit_pages=wal_limit_pages,
                checkpoint_interval=checkpoint_interval,
                journal_segment=journal_segment,
                clock=clock,
            )
        super().__init__(
            backend,
            max_pending_writes=max_pending_writes,
            on_commit=on_commit,
            on_ready=on_ready,
            on_failed=on_failed,
            signals=signals,
            clock=clock,
        )
        self.opened: Opened | None = None

    async def open(self) -> Opened:
        self.opened = await super().open()
        return self.opened

    @property
    def recovered_queued(self) -> int:
        """Tasks ``open`` found left running by a dead process and re-queued."""
        return self.opened.recovered_queued if self.opened else 0

    @property
    def recovered_failed(self) -> int:
        """Tasks ``open`` found left running on their last attempt, and failed."""
        return self.opened.recovered_failed if self.opened else 0

    @property
    def journal(self) -> AttemptJournal | None:
        """The SQLite backend's attempts journal (``None`` in memory or when unusable)."""
        return self._sqlite.journal if self._sqlite else None

    @property
    def wal_restarts(self) -> int:
        """Times the SQLite writer copied the whole WAL so that it starts over."""
        return self._sqlite.wal_restarts if self._sqlite else 0

    @property
    def shared(self) -> bool:
        """Several servers share this database (see ``Backend``)."""
        return self.backend.shared

    async def follow_events(self) -> None:
        """Before someone starts listening for events here (a stream, a waiter): on a
        shared database, have the other servers tell this one of their events from now
        on, and start from the cluster's last committed event when nobody here listened
        yet (``PostgresBackend.follow``). Nothing to do on SQLite."""
        backend = self.backend
        if isinstance(backend, PostgresBackend):
            await backend.follow()
            self.committed_event_id = max(self.committed_event_id, backend.delivered)

    async def unfollow_idle(self) -> None:
        """Now and then: on a shared database, stop following the other servers' events
        once nobody has listened here for a while (``PostgresBackend.unfollow_idle``)."""
        backend = self.backend
        if isinstance(backend, PostgresBackend):
            await backend.unfollow_idle()
            self.committed_event_id = max(self.committed_event_id, backend.delivered)

    @property
    def subscribers(self) -> SharedSubscribers | None:
        """Where the nodes of a cluster record their Mercure subscribers (once open;
        ``None`` on one server: its hub's connections are all there is)."""
        backend = self.backend
        return backend.subscribers if isinstance(backend, PostgresBackend) else None

    # --- reads of committed state: see ``Backend`` ------------------------------------

    async def get_task(self, task_id: int) -> Task | None:
        return await self.backend.get_task(task_id)

    async def list_tasks(
        self,
        *,
        state: TaskState | None,
        after: int,
        limit: int,
        before: int | None = None,
        queue: str | None = None,
        name: str | None = None,
        unique_key: str | None = None,
    ) -> list[Task]:
        return await self.backend.list_tasks(
            state=state,
            after=after,
            limit=limit,
            before=before,
            queue=queue,
            name=name,
            unique_key=unique_key,
        )

    async def ids_in_state(self, state: TaskState, limit: int) -> list[int]:
        return await self.backend.ids_in_state(state, limit)

    async def events_after(
        self, after_id: int, *, limit: int, task_id: int | None = None, tasks_only: bool = False
    ) -> list[Event]:
        return await self.backend.events_after(
            after_id, limit=limit, task_id=task_id, tasks_only=tasks_only
        )

    async def find_event(self, uid: str) -> int | None:
        return await self.backend.find_event(uid)

    async def count_by_state(self) -> dict[TaskState, int]:
        return await self.backend.count_by_state()

    async def count_by_queue(self) -> dict[str, dict[TaskState, int]]:
        return await self.backend.count_by_queue()

    async def next_due(self) -> float | None:
        return await self.backend.next_due()

    async def recent_unique(self, key: str, since: float) -> int | None:
        return await self.backend.recent_unique(key, since)

    async def schedules(self) -> dict[str, float]:
        return await self.backend.schedules()
