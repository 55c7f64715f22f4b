"""Behind a reverse proxy: which forwarded headers to believe (``trusted_proxies``).

A proxy in front of taskserver (``examples/deploy/nginx.conf``) connects from its own
address and says in headers who the client was and which URL it used. Anyone can send
those headers, so they are believed only from a peer in ``trusted_proxies`` (addresses
or CIDR networks); from any other peer they are ignored, as if absent. The contract:

* ``Forwarded`` (RFC 7239) when present, else ``X-Forwarded-For`` / ``-Proto`` /
  ``-Host`` (and ``-Port``). The client is the first hop, walking from the nearest
  proxy back, whose address is not a trusted proxy (nginx's ``real_ip_recursive``);
  scheme and host are the ones that hop's proxy received (``X-Forwarded-Proto`` and
  ``-Host``: their last value, the one the nearest proxy set).
* A malformed value (not an address, not ``http``/``https``, not a host) is ignored:
  that part stays what the socket says.
* The handler gets ``request.clone(remote=, scheme=, host=)``, marked ``PROXIED``:
  client addresses in logs, ``Origin`` checks and the hub's ``Link`` (``local_origin``),
  the ``Host`` check of an open loopback server, and the ``Secure`` cookie
  (``request.secure``) all follow. The original request keeps the client address for
  the access log (``CLIENT``). Task topics do not: they are built on ``base_url``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..config import Network, parse_networks
from ..push.origins import PROXIED, request_key
from .exposure import host_name

#: The client address a trusted proxy reported, on the original request (access log).
CLIENT: Any = request_key("taskserver_client", str)
SCHEMES = frozenset({"http", "https"})
DEFAULT_PORTS = {"http": "80", "https": "443"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _address(value: str) -> str | None:
    """An address as a forwarded header writes it (``[::1]:80``, ``1.2.3.4:5``, quoted)."""
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else ""
    elif value.count(":") == 1:
        value = value.split(":")[0]  # IPv4 with a port
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None  # "unknown", an obfuscated "_hidden", or garbage


@dataclass(frozen=True, slots=True)
class Origin:
    """Who the client was and which URL it used, as the trusted proxies say."""

    remote: str | None = None
    scheme: str | None = None
    host: str | None = None


class TrustedProxies:
    """The ``trusted_proxies`` networks, and the middleware that believes them."""

    def __init__(self, networks: tuple[Network, ...] | str) -> None:
        self.networks = parse_networks(networks) if isinstance(networks, str) else networks

    def __repr__(self) -> str:
        return f"<TrustedProxies {' '.join(map(str, self.networks)) or 'none'}>"

    def trusts(self, address: str | None) -> bool:
        """Whether ``address`` is one of the trusted proxies."""
        if address is None:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def origin(self, request: web.Request) -> Origin | None:
        """What the headers say, if the socket's peer is trusted; else ``None``."""
        if not self.trusts(request.remote):
            return None
        if "Forwarded" in request.headers:
            return self._forwarded(request)
        return self._x_forwarded(request)

    def _client(self, hops: list[str | None]) -> tuple[int, str | None]:
        """The index and address of the first untrusted hop from the right."""
        for i in range(len(hops) - 1, -1, -1):
            if not self.trusts(hops[i]):
                return i, hops[i]
        return 0, hops[0] if hops else None  # every hop a proxy: the farthest

    def _forwarded(self, request: web.Request) -> Origin:
        elements = list(request.forwarded)
        if not elements:
            return Origin()
        index, remote = self._client([_address(e.get("for", "")) for e in elements])
        element = elements[index]
        return Origin(remote, _scheme(element.get("proto")), _host(element.get("host")))

    def _x_forwarded(self, request: web.Request) -> Origin:
        headers = request.headers
        hops = [_address(v) for v in ",".join(headers.getall("X-Forwarded-For", [])).split(",")]
        remote = self._client(hops)[1] if any(hops) else None
        scheme = _scheme(_last(headers.getall("X-Forwarded-Proto", [])))
        host = _host(_last(headers.getall("X-Forwarded-Host", [])))
        port = _last(headers.getall("X-Forwarded-Port", []))
        default = DEFAULT_PORTS.get(scheme or request.scheme)
        # A host without its port (nginx's $host), and a port that is not the default.
        if host is not None and host_name(host) == host and port and port.isdigit():
            host = host if port == default else f"{host}:{port}"
        return Origin(remote, scheme, host)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Hand ``handler`` the request as the client made it, when a trusted proxy says so."""
        origin = self.origin(request)
        if origin is None:
            return await handler(request)
        changes: dict[str, str] = {}
        if origin.remote is not None:
            changes["remote"] = request[CLIENT] = origin.remote
        if origin.scheme is not None:
            changes["scheme"] = origin.scheme
        if origin.host is not None:
            changes["host"] = origin.host
        proxied = request.clone(**changes)  # type: ignore[arg-type]
        proxied[PROXIED] = True
        return await handler(proxied)


def _last(values: list[str]) -> str | None:
    parts = [p.strip() for p in ",".join(values).split(",") if p.strip()]
    return parts[-1] if parts else None


def _scheme(value: str | None) -> str | None:
    value = (value or "").strip().strip('"').lower()
    return value if value in SCHEMES else None


#: A host as a ``Host`` header writes it: a name or IPv4 address, or [IPv6]; a port.
_HOST = re.compile(r"(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?")


def _host(value: str | None) -> str | None:
    value = (value or "").strip().strip('"').lower()
    return value if _HOST.fullmatch(value) and host_name(value) is not None else None
