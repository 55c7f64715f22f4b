"""What ``netguard`` bounds connections with: ``ConnectionGuard`` (the bound, the
timeouts and the counts of one server), the raw answers it closes connections with,
and the open-files limit the bound is capped by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from aiohttp import web

from ..problems import PROBLEM, problem_body

#: netguard's logger: the guard is part of it.
log = logging.getLogger("taskserver.web.netguard")

#: Descriptors kept back from connections: SQLite and its WAL, process-pool pipes,
#: static files being sent, the loop's own, logs.
FD_RESERVE = 256
#: At most one "limit reached" warning this often, with the count refused since.
WARN_EVERY = 60.0
#: What a hard limit of "unlimited" is taken to mean when raising the soft one.
UNLIMITED_FILES = 1 << 20
#: aiohttp's bounds on a head's lines (request line, each header) and header count.
HEAD_LINE = 8190
HEAD_FIELDS = 100
#: Seconds a connection answered ``431`` goes on reading (and dropping) before it closes.
LINGER = 2.0


def _raw_problem(status: int, reason: str, detail: str, *extra: str) -> bytes:
    """A whole HTTP/1.1 problem response that closes the connection, as bytes."""
    body = problem_body(status, reason, detail)
    head = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {PROBLEM}",
        f"Content-Length: {len(body)}",
        *extra,
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(head).encode("ascii") + body


REFUSED = _raw_problem(
    503, "Service Unavailable", "too many open connections; retry later", "Retry-After: 1"
)
HEAD_TIMEOUT = _raw_problem(
    408, "Request Timeout", "the request's head did not arrive within request_head_timeout"
)
HEAD_TOO_LARGE = _raw_problem(
    431, "Request Header Fields Too Large", "the request's head is larger than max_head_bytes"
)


class BodyTimeout(web.HTTPRequestTimeout, TimeoutError):
    """Raised by a handler's body read when the body is late: a ``408`` that closes.

    Being a ``TimeoutError`` too lets aiohttp's lingering read after the response
    end quietly instead of logging it as unhandled.
    """

    def __init__(self) -> None:
        super().__init__(
            body=problem_body(
                408,
                "Request Timeout",
                "the request's body did not arrive within request_body_timeout",
                "body",
            ),
            content_type=PROBLEM,
        )
        self.force_close()


class ConnectionGuard:
    """The bound and the deadlines every connection of one server checks, and counts."""

    __slots__ = (
        "_warned_at",
        "_warned_refused",
        "body_timeout",
        "body_timeouts",
        "head_timeout",
        "head_timeouts",
        "heads_too_large",
        "limit",
        "max_head",
        "open",
        "refused",
    )

    def __init__(
        self, limit: int, head_timeout: float, body_timeout: float, max_head: int = 65_536
    ) -> None:
        self.limit = limit
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.max_head = max_head
        self.open = 0  # connections being served now
        self.refused = 0  # connections turned away at the bound, ever
        self.head_timeouts = 0
        self.body_timeouts = 0
        self.heads_too_large = 0
        self._warned_at = -WARN_EVERY
        self._warned_refused = 0

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new TLS connection in, or refuse it (closed, no answer) past the bound."""
        if self.open >= self.limit:
            self.refuse(cast(asyncio.Transport, transport), b"")
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1

    def refuse(self, transport: asyncio.Transport, answer: bytes = REFUSED) -> None:
        """Answer (``503``) on a connection past the bound and close it; warn now and then."""
        self.refused += 1
        if answer:
            transport.write(answer)
        transport.close()
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "connection limit %d reached: new connections get 503 (%d refused since"
                " the last warning); raise max_connections or the open-files limit",
                self.limit,
                self.refused - self._warned_refused,
            )
            self._warned_at = now
            self._warned_refused = self.refused

    def __repr__(self) -> str:
        return (
            f"<ConnectionGuard open={self.open}/{self.limit} refused={self.refused}"
            f" head_timeouts={self.head_timeouts} body_timeouts={self.body_timeouts}"
            f" heads_too_large={self.heads_too_large}>"
        )


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns (before, now)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. macOS caps it below the hard limit
            return soft, soft
        return soft, target
    return soft, soft


def connection_limit(wanted: int, open_files: int) -> int:
    """``wanted`` connections, capped to leave ``FD_RESERVE`` of ``open_files`` free."""
    return max(1, min(wanted, open_files - FD_RESERVE))
