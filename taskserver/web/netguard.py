"""Connections from hostile clients: a bound on them, deadlines for heads and bodies.

aiohttp bounds each line of a head and the number of its headers (given here:
``HEAD_LINE`` bytes, ``HEAD_FIELDS`` headers), a body (``client_max_size``) and
closes idle keep-alive connections (``keepalive_timeout``, from ``Settings``). What
it lacks is added per connection, by a ``RequestHandler`` subclass that
``runner()`` makes aiohttp use:

- a bound on open connections: past ``max_connections`` a new connection is
  answered ``503`` with ``Retry-After`` and closed before anything is parsed
  (over TLS, closed before its handshake: nothing can be said before one);
- a deadline for a request's head: ``request_head_timeout`` from accepting the
  connection (a TLS handshake included, which gets that long too), or from the
  first byte of a later head on a kept-alive one, then ``408`` (or a silent close
  when nothing was sent) and close;
- a deadline for a request's body: ``request_body_timeout`` from its head; the
  handler's read then raises ``BodyTimeout`` (a ``408`` that closes the connection);
- a bound on the bytes of a head that is not whole yet: ``max_head_bytes``, then
  ``431``; what the client still sends is read and dropped for ``LINGER`` seconds
  (or until it closes) so that it reads the answer instead of a reset. (aiohttp
  held up to ~1 MB of an unfinished head, 128 headers of 8 KiB, and before 3.12
  any number of headers: 300 such connections took the server from 56 to 634 MB.)

A request that arrives whole in one read costs a counter compared and one
``is_eof()``: timers are armed only per connection and for heads and bodies that
arrive in pieces. A request without a body (event streams, long polls) has no
deadline once its head has arrived; nor has an upgraded connection.

At start ``runner()`` raises the soft open-files limit to the hard one (with the
common soft limit of 1024, 1,100 idle connections left no descriptor for a new
client) and caps ``max_connections`` below it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any, cast

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from ..config import Settings
from .connbound import (
    FD_RESERVE,
    HEAD_FIELDS,
    HEAD_LINE,
    HEAD_TIMEOUT,
    HEAD_TOO_LARGE,
    LINGER,
    BodyTimeout,
    ConnectionGuard,
    connection_limit,
    raise_open_files_limit,
)
from .tls import TlsGate

__all__ = [
    "FD_RESERVE",
    "BodyTimeout",
    "ConnectionGuard",
    "GuardedRunner",
    "connection_limit",
    "raise_open_files_limit",
    "runner",
]

log = logging.getLogger(__name__)

_data_received = RequestHandler.data_received


def _trails(data: bytes, payload: StreamReader | None) -> bool:
    """Bytes of a further, incomplete head follow the last whole message in ``data``.

    A head ends with an empty line and a body with its own last bytes, which are still
    in its buffer: the handler reads them later. (A trailing partial head that happens
    to end like the body is missed, and is then bounded by ``keepalive_timeout``.)
    """
    if data.endswith(b"\r\n\r\n"):
        return False
    buffered = getattr(payload, "_buffer", None)
    return not (buffered and data.endswith(buffered[-1]))


def _tail(data: bytes, payload: StreamReader | None) -> int:
    """Bytes of ``data`` after the last whole message in it: exact when that had no body.

    After a body the count is not known and 0 is taken: a head is then counted from
    the next read on, so aiohttp's parser may hold one read more than the bound.
    """
    # EmptyStreamReader, what a request without a body has, lacks total_bytes before 3.12.
    if payload is not None and getattr(payload, "total_bytes", False):
        return 0
    return len(data) - data.rfind(b"\r\n\r\n") - 4


def _head_end(data: bytes) -> int:
    """Bytes of ``data`` up to the first place a head may end in it (-1: none).

    Generous: a bare LF ends a line for lenient parsers, and an end may begin in the
    previous read; any of them lets ``data`` through to the parser.
    """
    if data.startswith((b"\n", b"\r\n")):
        return 2
    ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
    return min(ends) + 3 if ends else -1


def _upgraded(handler: RequestHandler) -> bool:
    # aiohttp renamed the flag (``_upgrade`` before 3.12, ``_upgraded`` since).
    return bool(getattr(handler, "_upgraded", False) or getattr(handler, "_upgrade", False))


class _GuardedHandler(RequestHandler):
    """aiohttp's connection protocol, plus the bound and the head and body deadlines.

    Reads aiohttp's ``_waiter`` (set while waiting for a head, with no request in
    flight), ``_messages`` (heads parsed, not yet handled) and ``_request_count``.
    """

    __slots__ = (
        "_body_payload",
        "_body_timer",
        "_counted",
        "_guard",
        "_head_bytes",
        "_head_count",
        "_head_deadline",
        "_head_partial",
        "_head_timer",
        "_lingering",
    )

    def __init__(
        self,
        guard: ConnectionGuard,
        manager: web.Server,
        accepted: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``accepted``: the loop time a ``TlsGate`` admitted (and counted) the connection."""
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline = accepted or 0.0
        self._head_count = 0  # _request_count when the head being timed began
        self._head_partial = False  # some of that head arrived (so it gets a 408)
        self._head_bytes = 0  # how much of it
        self._lingering = False  # answered 431: reads are dropped until the close
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_payload: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if self._head_deadline:  # TLS: counted at accept; the head's time runs from then
            super().connection_made(transport)
            self._arm_head(self._head_deadline)
            return
        if guard.open >= guard.limit:
            # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
            guard.refuse(cast(asyncio.Transport, transport))  # never parsed: no task, no timer
            return
        guard.open += 1
        self._counted = True
        super().connection_made(transport)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._disarm_body()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        count = self._request_count
        body = self._body_payload  # a body that was still coming before this read
        if self._head_bytes + len(data) > self._guard.max_head and self._head_overflows(data):
            self._refuse_head()  # before aiohttp's parser holds it
            return
        _data_received(self, data)  # not super(): this runs for every read
        if self._request_count != count:
            # A head arrived: time its body unless that came whole with it.
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._arm_body(payload)
                return
            if not data or not _trails(data, payload):
                return
            fresh = _tail(data, payload)
        elif not data:
            # aiohttp resuming its parser after a body read: no byte of a next head came,
            # so an idle keep-alive connection is not timed (nor answered 408) as one.
            return
        elif body is not None:
            if not body.is_eof() or not _trails(data, body):
                return  # body bytes
            fresh = 0
        elif self._payload_parser is not None or _upgraded(self):
            return  # no longer HTTP (an upgrade, a WebSocket)
        else:
            fresh = len(data)
        # Bytes of a head that is not whole yet, perhaps pipelined behind a request in
        # flight (its deadline is then checked again once that request is done).
        if self._head_count != self._request_count or self._head_timer is None:
            self._arm_head()
        self._head_partial = True
        self._head_bytes += fresh
        if self._head_bytes > self._guard.max_head:
            self._refuse_head()

    def _head_overflows(self, data: bytes) -> bool:
        """A head is pending and ``data`` takes it past ``max_head_bytes`` before it ends."""
        if (
            self._head_count != self._request_count  # none pending: counted once fed
            or self._body_payload is not None
            or self._payload_parser is not None
            or _upgraded(self)
        ):
            return False
        end = _head_end(data)
        return end < 0 or self._head_bytes + end > self._guard.max_head

    def _refuse_head(self) -> None:
        """Answer ``431``, then read and drop what comes for ``LINGER`` seconds and close."""
        self._guard.heads_too_large += 1
        self._lingering = True
        transport = self.transport
        if transport is None:
            return
        if not self._awaiting_head():
            self.force_close()  # pipelined behind a response being sent: no room for a 431
            return
        transport.write(HEAD_TOO_LARGE)
        if transport.can_write_eof():
            transport.write_eof()  # the answer, then FIN; the client's close ends it sooner
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self._loop.call_later(LINGER, self.force_close)

    def _awaiting_head(self) -> bool:
        """No request in flight: aiohttp waits for a head (or has not begun to, on Python 3.11)."""
        waiter = self._waiter
        return (waiter is not None and not waiter.done()) or self._request_count == 0

    def _arm_head(self, since: float | None = None) -> None:
        self._head_count = self._request_count
        self._head_partial = False
        self._head_bytes = 0
        self._head_deadline = (since or self._loop.time()) + self._guard.head_timeout
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_count != self._head_count:
            return  # the head arrived; the next one is timed from its first byte
        if not self._awaiting_head():
            # A request is in flight (a long poll, a stream): the head behind it waits.
            self._head_timer = self._loop.call_later(self._guard.head_timeout, self._head_expired)
            return
        if self._loop.time() < self._head_deadline:  # re-armed for a later head
            self._head_timer = self._loop.call_at(self._head_deadline, self._head_expired)
            return
        self._guard.head_timeouts += 1
        if self._head_partial and self.transport is not None:
            self.transport.write(HEAD_TIMEOUT)
        self.force_close()

    def _arm_body(self, payload: StreamReader) -> None:
        self._disarm_body()
        self._body_payload = payload
        self._body_timer = self._loop.call_later(self._guard.body_timeout, self._body_expired)
        payload.on_eof(self._disarm_body)

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body_payload = None

    def _body_expired(self) -> None:
        payload = self._body_payload
        self._body_timer = None
        self._body_payload = None
        if payload is None or payload.is_eof() or payload.exception() is not None:
            return
        self._guard.body_timeouts += 1
        payload.set_exception(BodyTimeout())


class _GuardedServer(web.Server):
    """``web.Server`` making ``_GuardedHandler`` protocols with the settings of ``plain``,
    each behind a ``TlsGate`` when there is a ``tls`` context."""

    def __init__(
        self, guard: ConnectionGuard, plain: web.Server, tls: ssl.SSLContext | None
    ) -> None:
        super().__init__(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )
        self.guard = guard
        self.tls = tls

    def __call__(self) -> RequestHandler:
        if self.tls is None:
            return _GuardedHandler(self.guard, self, loop=self._loop, **self._kwargs)
        guard = self.guard
        gate = TlsGate(self.tls, self._tls_handler, guard.admit, guard.release, guard.head_timeout)
        return cast(RequestHandler, gate)  # the loop takes any protocol

    def _tls_handler(self) -> RequestHandler:
        accepted = self._loop.time()
        return _GuardedHandler(self.guard, self, accepted, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections obey ``guard``.

    With ``tls``, the runner serves TLS itself: give its sites no ``ssl_context``.
    """

    __slots__ = ("guard", "tls")

    def __init__(
        self,
        app: web.Application,
        guard: ConnectionGuard,
        tls: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.guard = guard
        self.tls = tls

    async def _make_server(self) -> web.Server:
        return _GuardedServer(self.guard, await super()._make_server(), self.tls)


def runner(
    app: web.Application,
    settings: Settings,
    tls: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> GuardedRunner:
    """An ``AppRunner`` for ``app`` with ``settings``' connection bound and timeouts.

    First raises the soft open-files limit to the hard one and logs it, once, with
    the connection bound that results. With ``tls`` it serves HTTPS: its sites must
    then have no ``ssl_context`` of their own. ``kwargs`` go to ``web.AppRunner``.
    """
    before, files = raise_open_files_limit()
    limit = connection_limit(settings.max_connections, files)
    log.info(
        "open files limit %d%s; at most %d connections%s",
        files,
        f" (raised from {before})" if files != before else "",
        limit,
        f" (max_connections {settings.max_connections} capped by it)"
        if limit < settings.max_connections
        else "",
    )
    guard = ConnectionGuard(
        limit,
        settings.request_head_timeout,
        settings.request_body_timeout,
        settings.max_head_bytes,
    )
    line = min(HEAD_LINE, settings.max_head_bytes)
    return GuardedRunner(
        app,
        guard,
        tls,
        keepalive_timeout=settings.keepalive_timeout,
        max_line_size=line,
        max_field_size=line,
        max_headers=HEAD_FIELDS,
        **kwargs,
    )
