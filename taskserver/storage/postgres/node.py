"""This node's own connection: its session lock, and what the other nodes say.

One connection per node, kept for its lifetime:

* it holds a **session advisory lock** named after the node's id. A second live
  process with the same id cannot take it and refuses to start; a restarted node
  takes it as soon as the old process is gone (the database drops a dead
  connection's locks), which proves the old run is over, so it can re-queue what
  that run left running at once instead of waiting for its lease to run out;
* it ``LISTEN``s for the other nodes' notifications (new events, cancel requests).

When the connection is lost it reconnects with backoff, and reports ``""`` on the
events channel once back (notifications sent meanwhile are lost: look anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from ...errors import ConfigError

log = logging.getLogger(__name__)
NODE_LOCK = "SELECT pg_try_advisory_lock(hashtextextended('taskserver:node:' || $1, 0))"
RECONNECT_CAP = 5.0


def where(dsn: str) -> str:
    """``user@host:port/database`` of a PostgreSQL URL, without its password."""
    parts = urlsplit(dsn)
    user = f"{unquote(parts.username)}@" if parts.username else ""
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    database = unquote(parts.path.lstrip("/")) or (unquote(parts.username or "") or "postgres")
    return f"{user}{host}:{port}/{database}"


def redact(dsn: str) -> str:
    """The URL with its password replaced (for logs)."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def connect_error(dsn: str, exc: BaseException) -> str:
    """One line saying why connecting to ``dsn`` failed and what to fix."""
    at = where(dsn)
    if isinstance(exc, asyncpg.InvalidPasswordError):
        return f"PostgreSQL at {at} refused the password: fix the password in --db / TASKSERVER_DB"
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        name = at.rsplit("/", 1)[1]
        return (
            f"PostgreSQL at {at}: database {name!r} does not exist: create it"
            f" (createdb {name}) or fix --db / TASKSERVER_DB"
        )
    if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        return f"PostgreSQL at {at} refused the user: {exc} (fix --db / TASKSERVER_DB)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host of --db ({at}): {exc.strerror or exc}"
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot reach PostgreSQL at {at}: {reason}: is it running, and is --db right?"
    if isinstance(exc, TimeoutError):
        return f"cannot reach PostgreSQL at {at}: timed out: is it running, and is --db right?"
    return f"cannot use PostgreSQL at {at}: {type(exc).__name__}: {exc}"


class Node:
    """The listening connection of node ``node_id``; ``on_notify(channel, payload, pid)``
    runs on the loop for every notification (``pid``: the notifying server process)."""

    def __init__(self, dsn: str, node_id: str, on_notify: Callable[[str, str, int], None]) -> None:
        self.dsn = dsn
        self.node_id = node_id
        self._on_notify = on_notify
        self._conn: asyncpg.Connection | None = None
        self._channels: list[str] = []
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self, channels: list[str]) -> None:
        """Connect, take the node's lock (``ConfigError`` if a live process holds it), listen."""
        self._channels = channels
        self._conn = await self._connect()
        if not await self._conn.fetchval(NODE_LOCK, self.node_id):
            await self._conn.close()
            self._conn = None
            raise ConfigError(
                f"another taskserver is running as node {self.node_id!r} on this database:"
                " give each one its own node_name (--node-name / TASKSERVER_NODE_NAME)"
            )
        await self._listen(self._conn)

    async def _connect(self) -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(self.dsn, server_settings={"jit": "off"})
        return conn

    async def _listen(self, conn: asyncpg.Connection) -> None:
        for channel in self._channels:
            await conn.add_listener(channel, self._notified)
        conn.add_termination_listener(self._lost)

    def _notified(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self._on_notify(channel, str(payload), pid)

    def _lost(self, conn: Any) -> None:
        if self._closing or self._reconnect is not None:
            return
        log.error("lost the connection to PostgreSQL (%s): reconnecting", where(self.dsn))
        self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        delay = 0.1
        try:
            while not self._closing:
                conn: asyncpg.Connection | None = None
                try:
                    conn = await self._connect()
                    if not await conn.fetchval(NODE_LOCK, self.node_id):
                        raise RuntimeError(f"node lock {self.node_id!r} is held by another session")
                    await self._listen(conn)
                except BaseException as exc:
                    if conn is not None:
                        conn.terminate()  # half set up (or the node is closing): not left open
                    if not isinstance(exc, Exception):
                        raise
                    log.warning("reconnecting to PostgreSQL failed: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(RECONNECT_CAP, delay * 2)
                    continue
                self._conn = conn
                log.info("reconnected to PostgreSQL (%s)", where(self.dsn))
                self._on_notify(self._channels[0], "", 0)  # what was missed meanwhile
                return
        finally:
            self._reconnect = None

    async def close(self) -> None:
        """Stop listening and let the lock go (closing the connection releases it)."""
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnect
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
