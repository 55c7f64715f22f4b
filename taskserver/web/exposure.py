"""Who can reach the server: the ``--host`` check at start, and the ``Host`` check.

``check_exposure`` refuses an open API (or an anonymous hub with public task events)
on a non-loopback address unless ``insecure_no_auth``.

Which ``Host`` an open loopback server answers: DNS rebinding stops at the Host header.

A page on ``evil.example`` whose name is made to resolve to 127.0.0.1 reaches a
loopback server as a same-origin request (no ``Origin`` on a GET), so the socket
address alone says nothing. While no credential is configured and the server listens on
loopback, only a ``Host`` that names loopback (``localhost``, 127.0.0.0/8, ``[::1]``),
the listening address, or ``base_url``'s host is answered, with or without a port;
anything else is a 421 naming ``base_url``. With a credential the token is what protects
the data, and on a non-loopback address (``insecure_no_auth``) any Host reaches the port
directly anyway: no check in either case.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from typing import Protocol

from aiohttp import web

from ..config import Settings
from ..errors import AccessDenied, ConfigError
from ..push.origins import proxied

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


class Guarded(Protocol):
    """What ``check_exposure`` needs of ``access.Access``."""

    @property
    def enforced(self) -> bool: ...


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine."""
    # Cached: check_host asks it of Host names, which repeat from request to request.
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def host_name(value: str) -> str | None:
    """A ``Host`` value's host, lowercase, without port or brackets; ``None`` if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :] if end > 0 else "?"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        return value[1:end]
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None  # also an IPv6 address without brackets
    return name or None


@functools.lru_cache(maxsize=256)
def _loopback_listening(sockname: object) -> str | None:
    """The address of a listening socket (``sockname``), lowercase, if it is a loopback one."""
    # One cached call per request for what is the same on every request of a socket.
    if not isinstance(sockname, tuple) or not is_loopback(str(sockname[0])):
        return None
    return str(sockname[0]).lower()


@functools.lru_cache(maxsize=256)
def _allowed(header: str, listening: str, base_host: str) -> bool:
    name = host_name(header)
    if name is None:
        return False
    return is_loopback(name) or name == listening or (bool(base_host) and name == base_host)


def check_host(request: web.Request, base_host: str) -> None:
    """``AccessDenied(421)`` for a ``Host`` that an open loopback server must not answer."""
    transport = request.transport
    listening = _loopback_listening(
        transport.get_extra_info("sockname") if transport is not None else None
    )
    if listening is None:
        return  # a Unix socket, or a non-loopback address: reachable without rebinding
    # Behind a trusted proxy: the host the client asked the proxy for.
    header = request.host if proxied(request) else request.headers.get("Host")
    if header is None or _allowed(header, listening, base_host):
        return
    raise AccessDenied(
        "this server answers loopback host names only while no credential is configured "
        "(DNS rebinding); set base_url to the URL browsers use, or configure api_token",
        status=421,
    )


def check_exposure(access: Guarded, settings: Settings) -> None:
    """Refuse to serve an open API on a non-loopback address unless ``insecure_no_auth``.

    The hub counts: with ``mercure_anonymous`` and public task events (no API credential,
    no ``mercure_private_tasks``) anyone would receive every task's events and results.
    With a credential task events are private (``MercureHub.tasks_private_by_api``).
    Raises ``ConfigError`` naming the setting to set; logs a warning when opted out.
    """
    if access.enforced or is_loopback(settings.host):
        return
    hub = ""
    if settings.mercure_anonymous and not settings.mercure_private_tasks:
        hub = " and mercure_anonymous sends every task's events and results to anyone"
    if not settings.insecure_no_auth:
        raise ConfigError(
            f"--host {settings.host} is reachable from other machines and no credential is "
            f"configured{hub}: set api_token (or api_tokens, api_jwt_key, an authorizer), "
            "or insecure_no_auth = true"
        )
    log.warning(
        "insecure_no_auth: the API on %s:%s has no authentication; anyone who reaches it "
        "can read, enqueue, cancel and purge tasks%s",
        settings.host,
        settings.port,
        hub,
    )
