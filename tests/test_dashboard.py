"""The demo dashboard's responses, from a real ``taskserver run``."""

from __future__ import annotations

import re
from collections.abc import Callable

import aiohttp

from .conftest import ServerProcess

#: The dashboard's page and every file it loads.
PATHS = ("/", "/static/dashboard.html", "/static/dashboard.js", "/static/dashboard.css")


async def test_no_dashboard_response_may_be_framed(
    run_server: Callable[..., ServerProcess],
) -> None:
    # An open loopback server: another site framing the dashboard could click its buttons.
    server = run_server()
    async with aiohttp.ClientSession() as session:
        page = await (await session.get(f"{server.url}/")).text()
        loaded = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
        assert loaded, page
        for path in {*PATHS, *loaded}:
            for method in ("GET", "HEAD"):
                async with session.request(method, f"{server.url}{path}") as response:
                    assert response.status == 200, (method, path)
                    assert response.headers["X-Frame-Options"] == "DENY", (method, path)
                    assert (
                        response.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
                    ), (method, path)
        async with session.get(f"{server.url}/static/missing.js") as missing:
            assert missing.status == 404
