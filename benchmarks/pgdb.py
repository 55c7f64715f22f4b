"""The PostgreSQL of the ``pg`` section: a private server, or one given with ``--db``.

By default a private server is started as the tests start theirs (``tests/pg_server.py``:
``initdb`` into a temporary directory, a free loopback port, stopped by its pid). With
``--db postgresql://...`` an existing server is used; its role must be allowed to
``CREATE DATABASE``. Either way each measurement gets a fresh database, dropped after it.

``cpu()`` is the CPU time (user + system, seconds) the whole server has used so far:
the postmaster's own, what its exited children used (``cutime`` + ``cstime``: the
postmaster reaps its backends), and every live child's. For a server given with ``--db``
that is known only when it runs on this machine, reached on loopback (its postmaster is
found as the parent of our backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tests.pg_server import PostgresServer, find_bindir

from .bench import BenchError


def _stat(pid: int) -> tuple[int, list[str]] | None:
    """(ppid, fields after the command name) of ``/proc/PID/stat``; ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[1]), fields


def server_cpu(postmaster: int) -> float | None:
    """CPU seconds of the postmaster, its reaped children and its live children."""
    own = _stat(postmaster)
    if own is None:
        return None
    ticks = sum(int(own[1][i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    for entry in os.listdir("/proc"):
        child = _stat(int(entry)) if entry.isdigit() else None
        if child is not None and child[0] == postmaster:
            ticks += int(child[1][11]) + int(child[1][12])
    return ticks / os.sysconf("SC_CLK_TCK")


def with_database(dsn: str, name: str) -> str:
    """``dsn`` naming database ``name`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


@dataclass
class Postgres:
    """Where the section's databases live."""

    admin_dsn: str
    postmaster: int | None
    label: str
    _names: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def cpu(self) -> float | None:
        return None if self.postmaster is None else server_cpu(self.postmaster)

    def _admin(self, sql: str) -> None:
        async def run() -> None:
            connection = await asyncpg.connect(self.admin_dsn)
            try:
                await connection.execute(sql)
            finally:
                await connection.close()

        asyncio.run(run())

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database's DSN, dropped on the way out."""
        name = f"taskserver_bench_{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        try:
            yield with_database(self.admin_dsn, name)
        finally:
            self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _postmaster_of(dsn: str) -> tuple[int | None, str]:
    connection = await asyncpg.connect(dsn)
    try:
        backend = await connection.fetchval("SELECT pg_backend_pid()")
        version = await connection.fetchval("SHOW server_version")
        found = _stat(int(backend))  # while connected: the backend ends with its session
    finally:
        await connection.close()
    host = urlsplit(dsn).hostname or ""
    local = host in ("", "localhost", "127.0.0.1", "::1") or host.startswith("/")
    if found is None or not local or _comm(found[0]) != "postgres":
        return None, str(version)  # another machine's pid could name anything here
    return found[0], str(version)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as comm:
            return comm.read().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def postgres(dsn: str | None) -> Iterator[Postgres]:
    """The given server (``dsn``), or a private one for the section's run."""
    if dsn is not None:
        try:
            postmaster, version = asyncio.run(_postmaster_of(dsn))
        except (OSError, asyncpg.PostgresError) as exc:
            raise BenchError(f"--db {urlsplit(dsn).hostname}: {exc}") from None
        where = "this machine" if postmaster is not None else "another machine: no CPU figure"
        yield Postgres(dsn, postmaster, f"PostgreSQL {version} given with --db ({where})")
        return
    bindir = find_bindir()
    if bindir is None:
        raise BenchError("no PostgreSQL server binaries: apt-get install postgresql, or --db")
    server = PostgresServer.start(bindir)
    try:
        _, version = asyncio.run(_postmaster_of(server.dsn))
        yield Postgres(server.dsn, server.pid, f"private PostgreSQL {version} (fsync on)")
    finally:
        server.stop()
