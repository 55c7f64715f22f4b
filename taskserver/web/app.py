"""The aiohttp application: routes, error shape, and the server's lifecycle.

Two ways in:

* ``create_app(settings, setup)`` builds a complete application, as
  ``taskserver run`` does;
* ``attach(app, server)`` adds taskserver to an aiohttp ``Application`` you
  already have: the server lives under the typed key ``TASKSERVER`` and starts
  and stops in one ``cleanup_ctx``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..config import Settings
from ..errors import ConfigError
from ..push import mercure
from ..server import TaskServer
from . import api, dashboard, http
from .access import Authorizer
from .demo import DEMO
from .forwarded import TrustedProxies

#: Where an application finds its TaskServer: ``request.app[TASKSERVER]``.
TASKSERVER = http.SERVER
#: Who may use the routes: ``app[ACCESS]`` (``access.Access``).
ACCESS = http.ACCESS

Setup = Callable[..., Any]


def attach(
    app: web.Application,
    server: TaskServer,
    *,
    prefix: str = "",
    authorize: Authorizer | None = None,
) -> None:
    """Mount taskserver on ``app``: API routes under ``prefix``, the dashboard at the
    ``dashboard_path`` setting, lifecycle, problem+json errors.

    ``authorize(request, scope)`` (as ``server.authorize``) lets the application decide
    who may use the routes, e.g. from its own session. The server starts when the
    application starts (before the port is bound when run by ``web.run_app``) and
    stops, gracefully, when it stops.
    """
    server.check()
    if authorize is not None:
        server.authorize(authorize)
    app[TASKSERVER] = server
    if server.settings.trusted_proxies:
        # First: every handler and middleware after it sees the client's request.
        app.middlewares.insert(0, TrustedProxies(server.settings.trusted_proxies).middleware)
    hub = mercure.add_routes(app, server)  # at /.well-known/mercure, whatever the prefix
    api.add_routes(app, server, prefix, hub)
    _mount_dashboard(app, server.settings.dashboard_path, prefix)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await server.start()
        yield
        await server.stop()

    async def close_streams(app: web.Application) -> None:
        # Before aiohttp waits for open handlers: SSE streams would otherwise hold it up.
        server.close_streams()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_streams)


def _mount_dashboard(app: web.Application, path: str, prefix: str) -> None:
    """The dashboard at ``path`` (and at ``/`` for the demo), its files under it."""
    demo = app.get(DEMO, False)
    paths = [path] if path else []
    if demo:
        paths.append("/")
    if paths:
        dashboard.mount(app, paths, assets=f"{path or ''}/static", api=prefix, demo=demo)


def load_setup(ref: str) -> Setup:
    """Import ``package.module:function``; ``ConfigError`` with one clear line otherwise."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {ref}: cannot import {module_name!r}: {exc}") from None
    setup = getattr(module, attr, None)
    if not callable(setup):
        raise ConfigError(f"--app {ref}: {module_name} has no function {attr!r}")
    return setup  # type: ignore[no-any-return]


async def run_setup(setup: Setup, server: TaskServer, app: web.Application) -> None:
    """Call ``setup(server)`` or ``setup(server, app)``, sync or async."""
    try:
        params = len(inspect.signature(setup).parameters)
    except (TypeError, ValueError):
        params = 1
    result = setup(server, app) if params >= 2 else setup(server)
    if inspect.isawaitable(result):
        await result


async def create_app(settings: Settings, setup: Setup | None = None) -> web.Application:
    """A complete application: ``setup`` (default: the built-in demo), then the API.

    Raises ``ConfigError`` (before anything is bound or opened) when the setup
    leaves a required callback missing.
    """
    if setup is None:
        from . import demo

        setup = demo.setup
    server = TaskServer(settings)
    app = web.Application(client_max_size=settings.max_body_bytes)
    await run_setup(setup, server, app)
    attach(app, server)
    return app
