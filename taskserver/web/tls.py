"""HTTPS without a proxy: the server's ``ssl.SSLContext`` from two PEM files, and
``TlsGate``, the protocol that counts a TLS connection from its accept.

TLS 1.2 at least, Python's default ciphers for a server; the key must not be
encrypted (nothing could type its password when a service starts).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ssl
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError


def server_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The context serving ``cert`` (the chain, PEM) with ``key``; ``None`` when both are empty.

    Raises ``ConfigError`` naming the setting when a file is missing or unusable.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "tls_key" if cert else "tls_cert"
        raise ConfigError(f"{missing} is not set: TLS needs both tls_cert and tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        # A password callback that gives none: an encrypted key fails instead of prompting.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert {cert} and tls_key {key} are not a PEM certificate and its unencrypted "
            f"private key: {exc.reason or exc}"
        ) from None
    return context


class TlsGate(asyncio.BufferedProtocol):
    """One accepted TLS connection: admitted or refused before its handshake, which then
    has ``handshake_timeout`` seconds; ``make_app()`` is its HTTP protocol after that.

    ``loop.create_server(ssl=...)`` tells the protocol nothing until a handshake is done,
    and not at all when it never is: connections that never handshake went uncounted
    (past any connection bound) and were held 60 s. This protocol is the raw one, so
    ``admit(transport)`` (False: it refused and closed it) and ``release()`` bracket the
    whole connection; TLS is the loop's own protocol, driven from here.
    """

    __slots__ = ("_admit", "_admitted", "_context", "_make_app", "_release", "_timeout", "_tls")

    def __init__(
        self,
        context: ssl.SSLContext,
        make_app: Callable[[], asyncio.BaseProtocol],
        admit: Callable[[asyncio.BaseTransport], bool],
        release: Callable[[], None],
        handshake_timeout: float,
    ) -> None:
        self._context = context
        self._make_app = make_app
        self._admit = admit
        self._release = release
        self._timeout = handshake_timeout
        self._admitted = False
        self._tls: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._admit(transport):
            return
        self._admitted = True
        loop = asyncio.get_running_loop()
        self._tls = _ssl_protocol(loop)(
            loop,
            self._make_app(),
            self._context,
            None,  # no waiter: the app protocol hears of the handshake
            server_side=True,
            ssl_handshake_timeout=self._timeout,
        )
        self._tls.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._release()
        if self._tls is not None:
            self._tls.connection_lost(exc)

    def get_buffer(self, sizehint: int) -> Any:
        if self._tls is None:  # refused and closing
            return bytearray(4096)
        return self._tls.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._tls is not None:
            self._tls.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        return None if self._tls is None else self._tls.eof_received()

    def pause_writing(self) -> None:
        if self._tls is not None:
            self._tls.pause_writing()

    def resume_writing(self) -> None:
        if self._tls is not None:
            self._tls.resume_writing()


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol class ``loop.create_server(ssl=...)`` itself would use."""
    try:
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.sslproto.SSLProtocol
    if isinstance(loop, uvloop.loop.Loop):
        # Not in uvloop's stubs: its create_server wraps each connection in it.
        return getattr(uvloop.loop, "SSLProtocol", asyncio.sslproto.SSLProtocol)
    return asyncio.sslproto.SSLProtocol
