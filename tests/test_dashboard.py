"""The dashboard's responses: served by every server at ``dashboard_path`` (the demo at
``/`` too), never framed, pointing at the API's prefix; from a real ``taskserver run``
and from ``attach``."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp
from aiohttp import web

from taskserver import Settings, TaskServer, attach

from .conftest import ServerProcess

#: The dashboard's pages and the files they load.
PATHS = ("/", "/dashboard", "/dashboard/static/dashboard.js", "/dashboard/static/dashboard.css")


async def test_no_dashboard_response_may_be_framed(
    run_server: Callable[..., ServerProcess],
) -> None:
    # An open loopback server: another site framing the dashboard could click its buttons.
    server = run_server()
    async with aiohttp.ClientSession() as session:
        page = await (await session.get(f"{server.url}/")).text()
        loaded = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page)
        assert loaded, page
        for path in {*PATHS, *loaded}:
            for method in ("GET", "HEAD"):
                async with session.request(method, f"{server.url}{path}") as response:
                    assert response.status == 200, (method, path)
                    assert response.headers["X-Frame-Options"] == "DENY", (method, path)
                    assert (
                        response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
                    ), (method, path)
        # Modules the page's script imports are served the same way.
        script = await (await session.get(f"{server.url}/dashboard/static/dashboard.js")).text()
        for module in re.findall(r'from "\./([\w-]+\.js)"', script):
            async with session.get(f"{server.url}/dashboard/static/{module}") as response:
                assert response.status == 200, module
        async with session.get(f"{server.url}/dashboard/static/missing.js") as missing:
            assert missing.status == 404


async def test_an_apps_server_serves_it_at_dashboard_path_only(
    run_server: Callable[..., ServerProcess],
) -> None:
    server = run_server("--app", "tests.helpers:setup_flaky", "--dashboard-path", "/ops")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/") as root:
            assert root.status == 404  # no demo: the application owns /
        async with session.get(f"{server.url}/ops") as page:
            assert page.status == 200
            text = await page.text()
        assert 'href="/ops/static/dashboard.css"' in text
        assert '<meta name="taskserver-demo" content="">' in text
        async with session.get(f"{server.url}/dashboard") as default:
            assert default.status == 404


async def test_attach_mounts_it_with_the_api_prefix(
    aiohttp_client: object, tmp_path: object
) -> None:
    server = TaskServer(Settings(db=":memory:", task_workers=0))
    app = web.Application()
    attach(app, server, prefix="/jobs")
    client = await aiohttp_client(app)  # type: ignore[operator]
    text = await (await client.get("/dashboard")).text()
    assert '<meta name="taskserver-api" content="/jobs">' in text
    assert (await client.get("/dashboard/static/api.js")).status == 200
    none = web.Application()
    attach(none, TaskServer(Settings(db=":memory:", task_workers=0, dashboard_path="")))
    assert not any(
        getattr(r.resource, "canonical", "").startswith("/dashboard") for r in none.router.routes()
    )
