"""Where a request came in, as the hub and the API write it in URLs: the public origin
(``base_url``, else the listening socket, or what a trusted proxy reported), and the
Mercure discovery ``Link`` built on it. Never the ``Host`` header of an untrusted peer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from aiohttp import web

HUB_PATH = "/.well-known/mercure"


def public_origin(request: web.Request, base_url: str) -> str:
    """``base_url`` without its trailing slash, or the origin of the socket the request came in on.

    Never the ``Host`` header: a client can write anything there, and what is built on
    it (the discovery ``Link``, URLs a token must match) would point where it says.
    """
    return base_url.rstrip("/") if base_url else local_origin(request)


def request_key(name: str, kind: type) -> Any:
    """A key of request storage: ``web.RequestKey`` where aiohttp has it, else the name."""
    key_type = getattr(web, "RequestKey", None)  # newer aiohttp warns about plain str keys
    return key_type(name, kind) if key_type is not None else name


#: Set on a request whose scheme and host a trusted proxy reported (``web/forwarded.py``).
PROXIED: Any = request_key("taskserver_proxied", bool)


def proxied(request: web.Request) -> bool:
    """Whether a trusted proxy reported ``request``'s scheme and host (``PROXIED``)."""
    # len() first: get() raises and catches a KeyError for an absent key (~0.4 us a call,
    # twice per request), and a request stores nothing unless a middleware put it there.
    return len(request) > 0 and bool(request.get(PROXIED))


def local_origin(request: web.Request) -> str:
    """``scheme://address:port`` of the listening socket that accepted ``request``, or,
    behind a trusted proxy (``PROXIED``), the scheme and host the proxy received."""
    if proxied(request):
        return _proxied_origin(request.scheme, request.host)
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    scheme = request.scheme
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return f"{scheme}://localhost"  # a Unix socket, or a closed connection
    return _origin(scheme, str(sockname[0]), int(sockname[1]))


@functools.lru_cache(maxsize=64)
def _origin(scheme: str, host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    if (scheme, port) in (("http", 80), ("https", 443)):
        return f"{scheme}://{host}"  # as browsers write an Origin
    return f"{scheme}://{host}:{port}"


@functools.lru_cache(maxsize=64)
def _proxied_origin(scheme: str, host: str) -> str:
    host = host.lower()
    default = ":443" if scheme == "https" else ":80"
    return f"{scheme}://{host.removesuffix(default)}"  # as browsers write an Origin


def discovery_link(request: web.Request, base_url: str) -> str:
    """``Link: <…/.well-known/mercure>; rel="mercure"``, on ``base_url`` or the listening socket."""
    return _link_to_hub(public_origin(request, base_url))


@functools.lru_cache(maxsize=64)
def _link_to_hub(origin: str) -> str:
    return f'<{origin}{HUB_PATH}>; rel="mercure"'


def discovery_links(base_url: str) -> Callable[[web.Request], str]:
    """``discovery_link`` with ``base_url`` bound, for a hook run on every response: a
    constant when ``base_url`` is set, else the listening socket's link, looked up once
    per socket and scheme (fewer calls than ``discovery_link``, the same text)."""
    if base_url:
        link = _link_to_hub(base_url.rstrip("/"))
        return lambda request: link
    return _socket_link


def _socket_link(request: web.Request) -> str:
    if proxied(request):
        return _link_to_hub(local_origin(request))
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return _link_to_hub(local_origin(request))  # a Unix socket, or a closed connection
    return _link_of_socket(request.scheme, sockname)


@functools.lru_cache(maxsize=64)
def _link_of_socket(scheme: str, sockname: tuple[Any, ...]) -> str:
    return _link_to_hub(_origin(scheme, str(sockname[0]), int(sockname[1])))
