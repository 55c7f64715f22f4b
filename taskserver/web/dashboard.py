"""The live dashboard: one HTML page, its CSS and JS (``static/``), no build step.

``mount`` serves the page at a path (``dashboard_path``, and the demo's ``/``) and its
files under ``<path>/static/``. The page reveals nothing by itself: what it shows
comes from the API under the API's authentication (``access.py``: the login form
posts to ``/session``, which keeps the token in an HttpOnly cookie; writes are
CSRF-checked). Every response carries ``FRAMING``: no other site may frame it.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from functools import cache
from importlib import resources
from pathlib import Path

from aiohttp import web

#: The dashboard's files.
STATIC = Path(__file__).with_name("static")
#: Served as files (the page itself is rendered: ``page``): its scripts and styles.
ASSETS = tuple(sorted(p.name for p in STATIC.iterdir() if p.suffix in (".css", ".js")))
#: No other site may frame the dashboard (clickjacking its Cancel and Retry buttons).
FRAMING = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@cache
def _template() -> str:
    return resources.files("taskserver.web").joinpath("static/dashboard.html").read_text("utf-8")


def page(*, assets: str, api: str, demo: bool) -> str:
    """The page, its asset and API paths filled in (``assets``: where ``ASSETS`` are)."""
    return (
        _template()
        .replace("__ASSETS__", html.escape(assets, quote=True))
        .replace("__API__", html.escape(api, quote=True))
        .replace("__DEMO__", "1" if demo else "")
    )


def _page_handler(text: str) -> Handler:
    async def send(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="text/html", headers=dict(FRAMING))

    return send


def _file_handler(path: Path) -> Handler:
    async def send(request: web.Request) -> web.FileResponse:
        return web.FileResponse(path, headers=dict(FRAMING))

    return send


def mount(
    app: web.Application,
    paths: list[str],
    *,
    assets: str,
    api: str = "",
    demo: bool = False,
) -> None:
    """Serve the page at each of ``paths`` and ``ASSETS`` under ``assets`` (a path).

    ``api`` is the prefix the API routes were added under; ``demo`` shows the demo's
    Request form. Each file has a route of its own (not ``add_static``) so that every
    response carries ``FRAMING``.
    """
    send = _page_handler(page(assets=assets, api=api, demo=demo))
    for path in paths:
        app.router.add_get(path, send)
    for name in ASSETS:
        app.router.add_get(f"{assets}/{name}", _file_handler(STATIC / name))
