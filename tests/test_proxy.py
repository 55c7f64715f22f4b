"""Behind a reverse proxy: forwarded headers believed from ``trusted_proxies`` only, and
event streams that tell nginx not to buffer them.

The test client connects from 127.0.0.1: trusting ``127.0.0.1`` makes it the proxy,
trusting ``10.0.0.0/8`` makes it an ordinary client forging the headers.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from taskserver import TASKSERVER, Settings, TaskServer, attach
from taskserver.config import load_settings
from taskserver.errors import ConfigError

from .conftest import ClientFactory, noop_finish, noop_task

Client = TestClient[web.Request, web.Application]
TOKEN = "a-token-for-the-proxy-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PUBLIC = "https://tasks.example.com"
FORWARDED = {
    "X-Forwarded-For": "203.0.113.7",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "tasks.example.com",
}


async def whoami(request: web.Request) -> web.Response:
    """What a handler of the application sees of the request."""
    return web.json_response(
        {"remote": request.remote, "scheme": request.scheme, "host": request.host}
    )


async def serve(aiohttp_client: Any, settings: Settings, **overrides: Any) -> Client:
    values = {**{f: getattr(settings, f) for f in settings.__dataclass_fields__}, **overrides}
    server = TaskServer(Settings(**values))
    server.on("task", noop_task)
    server.on("finish", noop_finish)
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    attach(app, server)
    client: Client = await aiohttp_client(app)
    return client


async def test_a_trusted_proxy_is_believed(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(aiohttp_client, settings, api_token=TOKEN, trusted_proxies="127.0.0.1")
    seen = await (await client.get("/whoami", headers=FORWARDED)).json()
    assert seen == {"remote": "203.0.113.7", "scheme": "https", "host": "tasks.example.com"}
    # The hub's discovery Link is built on the URL the client used.
    response = await client.get("/tasks", headers={**AUTH, **FORWARDED})
    assert f"<{PUBLIC}/.well-known/mercure>" in response.headers["Link"]
    # A write from the public origin is this server's own; from the socket's, it is not
    # (the dashboard's login, then a write with its cookie: the CSRF checks).
    own = str(client.make_url("")).rstrip("/")
    session: dict[str, Any] = {"json": {"token": TOKEN}, "headers": {**FORWARDED, "Origin": own}}
    assert (await client.post("/session", **session)).status == 403
    caplog.set_level(logging.INFO, "taskserver")
    session["headers"]["Origin"] = PUBLIC
    login = await client.post("/session", **session)
    assert login.status == 200
    # The cookie is Secure: the browser speaks HTTPS to the proxy.
    assert "Secure" in login.headers["Set-Cookie"]
    assert "from 203.0.113.7" in caplog.text  # the client's address in the log
    cookie = {"Cookie": f"taskserver_token={TOKEN}", **FORWARDED}
    write: dict[str, Any] = {"json": {"data": 1}, "headers": {**cookie, "Origin": PUBLIC}}
    assert (await client.post("/tasks", **write)).status == 202
    write["headers"]["Origin"] = own
    assert (await client.post("/tasks", **write)).status == 403


async def test_headers_from_an_untrusted_peer_are_ignored(
    aiohttp_client: Any, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = await serve(aiohttp_client, settings, api_token=TOKEN, trusted_proxies="10.0.0.0/8")
    own = str(client.make_url("")).rstrip("/")
    seen = await (await client.get("/whoami", headers=FORWARDED)).json()
    assert seen["remote"] == "127.0.0.1"
    assert seen["scheme"] == "http"
    assert seen["host"] == own.removeprefix("http://")
    response = await client.get("/tasks", headers={**AUTH, **FORWARDED})
    assert f"<{own}/.well-known/mercure>" in response.headers["Link"]
    session: dict[str, Any] = {"json": {"token": TOKEN}, "headers": {**FORWARDED, "Origin": PUBLIC}}
    assert (await client.post("/session", **session)).status == 403  # forged: not ours
    caplog.set_level(logging.INFO, "taskserver")
    session["headers"]["Origin"] = own
    login = await client.post("/session", **session)
    assert login.status == 200
    assert "Secure" not in login.headers["Set-Cookie"]
    assert "from 127.0.0.1" in caplog.text
    assert "203.0.113.7" not in caplog.text


async def test_no_setting_no_belief(make_client: ClientFactory) -> None:
    client = await make_client(api_token=TOKEN)
    response = await client.get("/tasks", headers={**AUTH, **FORWARDED})
    own = str(client.make_url("")).rstrip("/")
    assert f"<{own}/.well-known/mercure>" in response.headers["Link"]


OWN = "the socket's"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # RFC 7239: the element the nearest proxy added after each trusted hop.
        (
            {"Forwarded": 'for=198.51.100.1;proto=https;host="tasks.example.com"'},
            ("198.51.100.1", "https", "tasks.example.com"),
        ),
        (
            {"Forwarded": 'for=6.6.6.6;host=evil.example, for="[2001:db8::1]:443";proto=https'},
            ("2001:db8::1", "https", OWN),
        ),
        # A chain: trusted hops are skipped from the right; what the client wrote left of
        # the first untrusted one is not believed.
        ({"X-Forwarded-For": "6.6.6.6, 198.51.100.9, 10.1.2.3"}, ("198.51.100.9", "http", OWN)),
        # The last value: the one the nearest proxy set.
        (
            {"X-Forwarded-Proto": "http, https", "X-Forwarded-Host": "a.example, b.example"},
            ("127.0.0.1", "https", "b.example"),
        ),
        (
            {"X-Forwarded-Host": "tasks.example.com", "X-Forwarded-Port": "8443"},
            ("127.0.0.1", "http", "tasks.example.com:8443"),
        ),
        (
            {"X-Forwarded-Host": "tasks.example.com", "X-Forwarded-Port": "80"},
            ("127.0.0.1", "http", "tasks.example.com"),
        ),
        # Malformed values change nothing.
        (
            {
                "X-Forwarded-For": "not-an-address",
                "X-Forwarded-Proto": "gopher",
                "X-Forwarded-Host": "evil.example/path",
            },
            ("127.0.0.1", "http", OWN),
        ),
    ],
)
async def test_forwarded_header_forms(
    aiohttp_client: Any,
    settings: Settings,
    headers: dict[str, str],
    expected: tuple[str, str, str],
) -> None:
    client = await serve(
        aiohttp_client, settings, api_token=TOKEN, trusted_proxies="127.0.0.1, 10.0.0.0/8"
    )
    seen = await (await client.get("/whoami", headers=headers)).json()
    own = str(client.make_url("")).removeprefix("http://").rstrip("/")
    remote, scheme, host = expected
    assert (seen["remote"], seen["scheme"], seen["host"]) == (
        remote,
        scheme,
        own if host == OWN else host,
    )


async def test_an_open_loopback_server_checks_the_forwarded_host(
    aiohttp_client: Any, settings: Settings
) -> None:
    # No credential: DNS rebinding through the proxy is refused like any foreign Host.
    client = await serve(aiohttp_client, settings, trusted_proxies="127.0.0.1")
    assert (await client.get("/tasks", headers=FORWARDED)).status == 421
    assert (await client.get("/tasks")).status == 200
    client = await serve(aiohttp_client, settings, trusted_proxies="127.0.0.1", base_url=PUBLIC)
    assert (await client.get("/tasks", headers=FORWARDED)).status == 200
    forged = {**FORWARDED, "X-Forwarded-Host": "evil.example"}
    assert (await client.get("/tasks", headers=forged)).status == 421


def test_the_setting_takes_addresses_and_networks(tmp_path: Any) -> None:
    env = {"TASKSERVER_TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8 ::1"}
    assert load_settings(env=env).trusted_proxies == "127.0.0.1, 10.0.0.0/8 ::1"
    config = tmp_path / "taskserver.toml"
    config.write_text('trusted_proxies = ["127.0.0.1", "fd00::/8"]\n')
    assert load_settings(config_file=config, env={}).trusted_proxies == "127.0.0.1 fd00::/8"
    with pytest.raises(ConfigError, match=r"trusted_proxies: 'proxy.local' is not an IP"):
        load_settings(env={"TASKSERVER_TRUSTED_PROXIES": "10.0.0.1 proxy.local"})


@pytest.mark.parametrize("path", ["/events", "/tasks/{id}/events", "/.well-known/mercure"])
async def test_event_streams_are_not_buffered_by_nginx(
    make_client: ClientFactory, path: str
) -> None:
    client = await make_client(task_workers=0, mercure_anonymous=True)
    task_id = await client.app[TASKSERVER].task("x")
    url = path.replace("{id}", str(task_id))
    params = {"topic": "*"} if "mercure" in path else {}
    async with client.get(url, params=params) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
    plain = await client.get(f"/tasks/{task_id}")
    assert "X-Accel-Buffering" not in plain.headers
