"""Nobody gets in without a token: scopes, JWTs, the authorizer, the cookie, privacy.

Real servers on loopback (``aiohttp_client``), real tokens and real JWTs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from taskserver import (
    TASKSERVER,
    AccessDenied,
    ApiToken,
    ConfigError,
    PermanentError,
    Settings,
    TaskContext,
    TaskServer,
    attach,
    load_settings,
)

from .conftest import ClientFactory, noop_finish, noop_task, sse, wait_for

Client = TestClient[web.Request, web.Application]

ADMIN_TOKEN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
ENQUEUER = "enqueuer-token-0123456789abcdef"
HASHED = "hashed-token-0123456789abcdef"
JWT_KEY = "a-jwt-secret-of-at-least-32-bytes!!"
MERCURE_KEY = "!ChangeThisMercureHubJWTSecretKey!"
HUB = "/.well-known/mercure"

TOKENS = (
    ApiToken.create("reader", READER, ["read"]),
    ApiToken.create("enqueuer", ENQUEUER, ["enqueue"]),
    *load_settings(
        env={},
        overrides={
            "api_tokens": {
                "hashed": {
                    "sha256": hashlib.sha256(HASHED.encode()).hexdigest(),
                    "scopes": ["read", "enqueue"],
                }
            }
        },
    ).api_tokens,
)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def origin_of(client: Client) -> str:
    return f"http://127.0.0.1:{client.port}"


async def fail_task(ctx: TaskContext) -> Any:
    raise PermanentError("asked to fail")


async def secured(make_client: ClientFactory, task: Any = noop_task, **overrides: Any) -> Client:
    values: dict[str, Any] = {"api_token": ADMIN_TOKEN, "api_tokens": TOKENS}
    return await make_client(task, **{**values, **overrides})


async def ended(client: Client, task_id: int, headers: dict[str, str]) -> dict[str, Any]:
    async def state() -> dict[str, Any] | None:
        response = await client.get(f"/tasks/{task_id}", headers=headers)
        body: dict[str, Any] = await response.json()
        return body if body["state"] in ("succeeded", "failed", "cancelled") else None

    result: dict[str, Any] = await wait_for(state, message=f"task {task_id} to end")
    return result


# --- scopes -----------------------------------------------------------------------------


#: (method, path, body, scope) of every route that needs one; {id} is task 1.
ROUTES = [
    ("POST", "/tasks", {"data": 1}, "enqueue"),
    ("POST", "/tasks:batch", {"tasks": [{"data": 1}]}, "enqueue"),
    ("GET", "/tasks", None, "read"),
    ("GET", "/tasks/1", None, "read"),
    ("GET", "/stats", None, "read"),
    ("POST", "/tasks/1/retry", None, "admin"),
    ("POST", "/tasks:retry", {"ids": [1]}, "admin"),
    ("POST", "/tasks:purge", {"older_than": 3600}, "admin"),
    ("DELETE", "/tasks/1", None, "admin"),
    ("GET", "/queues", None, "read"),
    ("POST", "/queues/default/pause", None, "admin"),
    ("POST", "/queues/default/resume", None, "admin"),
    ("POST", "/tasks:bulk", {"action": "retry", "ids": [1]}, "admin"),
]


async def test_every_route_needs_a_token_with_its_scope(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    response = await client.post("/tasks", json={"data": 0}, headers=bearer(ADMIN_TOKEN))
    assert response.status == 202
    await ended(client, 1, bearer(ADMIN_TOKEN))
    tokens = {"read": READER, "enqueue": ENQUEUER}
    for method, path, body, scope in ROUTES:
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        # No credential: 401 with a Bearer challenge, as problem+json.
        response = await client.request(method, path, **kwargs)
        assert response.status == 401, (method, path)
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="taskserver"'
        assert response.content_type == "application/problem+json"
        # A wrong one: 401, invalid_token.
        response = await client.request(method, path, headers=bearer("x" * 30), **kwargs)
        assert response.status == 401
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
        # Valid, without the scope: 403 naming it.
        for name, token in tokens.items():
            response = await client.request(method, path, headers=bearer(token), **kwargs)
            if name == scope:
                assert response.status < 400, (method, path, name, await response.text())
            else:
                assert response.status == 403, (method, path, name)
                problem = await response.json()
                assert scope in problem["detail"]
                assert f'scope="{scope}"' in response.headers["WWW-Authenticate"]
        # admin implies every scope.
        response = await client.request(method, path, headers=bearer(ADMIN_TOKEN), **kwargs)
        assert response.status < 400 or response.status == 409, (method, path)


async def test_event_streams_need_read(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    await client.post("/tasks", json={"data": 0}, headers=bearer(ADMIN_TOKEN))
    for path in ("/events", "/tasks/1/events"):
        assert (await client.get(path)).status == 401
        assert (await client.get(path, headers=bearer(ENQUEUER))).status == 403
    async with client.get("/tasks/1/events", headers=bearer(READER)) as response:
        types = [e.event for e in await sse(response).collect()]
        assert types[-1] == "finished"
    async with client.get("/events", headers=bearer(READER)) as response:
        assert response.status == 200


async def test_a_hashed_token_from_the_config_file(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    assert (await client.post("/tasks", json={"data": 0}, headers=bearer(HASHED))).status == 202
    assert (await client.get("/tasks/1", headers=bearer(HASHED))).status == 200
    assert (await client.delete("/tasks/1", headers=bearer(HASHED))).status == 403


async def test_health_stays_open_and_reveals_nothing(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"status": "ok"}


async def test_bad_authorization_headers_are_401(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    for header in ("Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer  ", ADMIN_TOKEN):
        response = await client.get("/stats", headers={"Authorization": header})
        assert response.status == 401, header
    # The token's prefix, or the token with a byte more, are different tokens.
    for near in (ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x"):
        assert (await client.get("/stats", headers=bearer(near))).status == 401


# --- JWTs ---------------------------------------------------------------------------------


def api_jwt(scopes: Any, key: Any = JWT_KEY, alg: str = "HS256", **claims: Any) -> str:
    return jwt.encode({"taskserver": {"scopes": scopes}, **claims}, key, algorithm=alg)


def unsigned(claims: dict[str, Any]) -> str:
    """A token with ``alg: none``, as an attacker writes one."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(b'{"alg":"none"}')
    return f"{header}.{b64(json.dumps(claims).encode())}."


async def test_hs256_jwts_carry_scopes(make_client: ClientFactory) -> None:
    client = await make_client(api_jwt_key=JWT_KEY)
    reader = api_jwt(["read"], sub="grafana")
    assert (await client.get("/stats", headers=bearer(reader))).status == 200
    assert (await client.post("/tasks", json={"data": 1}, headers=bearer(reader))).status == 403
    admin = api_jwt(["admin"], exp=int(time.time()) + 60)
    assert (await client.post("/tasks", json={"data": 1}, headers=bearer(admin))).status == 202
    refused = {
        "expired": api_jwt(["admin"], exp=int(time.time()) - 10),
        "other key": api_jwt(["admin"], key="another-secret-of-at-least-32-bytes!"),
        "unknown scope": api_jwt(["root"]),
        "alg none": unsigned({"taskserver": {"scopes": ["admin"]}}),
    }
    for why, token in refused.items():
        response = await client.get("/stats", headers=bearer(token))
        assert response.status == 401, why
        assert 'error="invalid_token"' in response.headers["WWW-Authenticate"], why
    # A valid token without the claim has no scope.
    no_claim = jwt.encode({"sub": "x"}, JWT_KEY, algorithm="HS256")
    assert (await client.get("/stats", headers=bearer(no_claim))).status == 403


async def test_rs256_jwts(make_client: ClientFactory) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client = await make_client(api_jwt_key=public_pem, api_jwt_alg="RS256")
    token = api_jwt(["read"], key=private, alg="RS256")
    assert (await client.get("/stats", headers=bearer(token))).status == 200
    hs = api_jwt(["read"], key=public_pem.encode()[:64].decode() * 2)
    assert (await client.get("/stats", headers=bearer(hs))).status == 401


# --- an embedded application decides ------------------------------------------------------------


async def test_the_authorizer_decides_from_the_host_apps_session(
    settings: Settings, aiohttp_client: Any
) -> None:
    seen: list[tuple[str, str]] = []

    async def authorize(request: web.Request, scope: str) -> bool:
        seen.append((request.path, scope))
        user = request.cookies.get("session")  # the host app's own session
        if user is None:
            raise AccessDenied("log in first", status=401, challenge='Cookie realm="app"')
        return user == "alice" or scope == "read"

    server = TaskServer(settings)
    server.on("task", noop_task)
    server.on("finish", noop_finish)
    app = web.Application()
    attach(app, server, authorize=authorize)
    client: Client = await aiohttp_client(app)
    response = await client.get("/stats")
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == 'Cookie realm="app"'
    assert (await client.get("/stats", cookies={"session": "bob"})).status == 200
    response = await client.post("/tasks", json={"data": 1}, cookies={"session": "bob"})
    assert response.status == 403
    response = await client.post("/tasks", json={"data": 1}, cookies={"session": "alice"})
    assert response.status == 202
    assert seen[-2:] == [("/tasks", "enqueue"), ("/tasks", "enqueue")]
    # A write carrying another site's Origin never reaches the authorizer.
    response = await client.post(
        "/tasks",
        json={"data": 1},
        cookies={"session": "alice"},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status == 403
    assert len(seen) == 4
    assert (await client.get("/healthz")).status == 200
    assert len(seen) == 4


async def test_the_authorizer_sees_the_apps_own_authorization_scheme(
    make_client: ClientFactory,
) -> None:
    client = await secured(make_client)
    server = client.app[TASKSERVER]
    server.authorize(lambda request, scope: request.headers["Authorization"] == "Basic YTpi")
    assert (await client.get("/stats", headers={"Authorization": "Basic YTpi"})).status == 200
    assert (await client.get("/stats", headers={"Authorization": "Basic eDp5"})).status == 403
    # Our tokens still work beside it, without asking it.
    assert (await client.get("/stats", headers=bearer(READER))).status == 200


async def test_a_sync_authorizer_by_decorator(make_client: ClientFactory) -> None:
    client = await make_client()
    server = client.app[TASKSERVER]

    @server.authorize
    def only_reads(request: web.Request, scope: str) -> bool:
        return scope == "read"

    assert (await client.get("/stats")).status == 200
    assert (await client.post("/tasks", json={"data": 1})).status == 403


# --- the dashboard's cookie and CSRF -------------------------------------------------------------


async def login(client: Client, token: str) -> Any:
    return await client.post(
        "/session", json={"token": token}, headers={"Origin": origin_of(client)}
    )


async def test_login_sets_an_httponly_strict_cookie(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    assert (await client.get("/session")).status == 200
    body = await (await client.get("/session")).json()
    assert body == {"required": True, "authenticated": False, "scopes": []}
    response = await login(client, "wrong-token-0123456789")
    assert response.status == 401
    response = await login(client, READER)
    assert response.status == 200
    assert await response.json() == {"name": "api_tokens.reader", "scopes": ["read"]}
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("taskserver_token=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {p.strip() for p in cookie.split(";")}
    assert "Secure" not in cookie  # plain HTTP here; see test_tls for HTTPS
    # The client's jar now sends it: reads work, the session says who.
    assert (await client.get("/stats")).status == 200
    body = await (await client.get("/session")).json()
    assert (body["authenticated"], body["scopes"]) == (True, ["read"])
    # Logout forgets it.
    response = await client.delete("/session")
    assert response.status == 204
    assert (await client.get("/stats")).status == 401


async def test_login_needs_this_origin(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    for headers in ({}, {"Origin": "https://evil.example"}):
        response = await client.post("/session", json={"token": ADMIN_TOKEN}, headers=headers)
        assert response.status == 403, headers
        assert "Set-Cookie" not in response.headers


async def test_a_cross_site_form_post_with_the_cookie_is_refused(
    make_client: ClientFactory,
) -> None:
    client = await secured(make_client, fail_task)
    assert (await login(client, ADMIN_TOKEN)).status == 200
    assert (await client.post("/tasks", json={"data": 1})).status == 403  # no Origin
    same = {"Origin": origin_of(client)}
    response = await client.post("/tasks", json={"data": 1}, headers=same)
    assert response.status == 202
    task_id = (await response.json())["id"]
    assert (await ended(client, task_id, {}))["state"] == "failed"
    # What a form on another site sends: the cookie (our jar), its Origin, a form body.
    form = {"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post(f"/tasks/{task_id}/retry", data="x=1", headers=form)
    assert response.status == 403
    assert "evil.example" in (await response.json())["detail"]
    response = await client.post(f"/tasks/{task_id}/retry", data="x=1", headers={})
    assert response.status == 403  # a cookie write without Origin
    assert (await client.get(f"/tasks/{task_id}")).status == 200
    assert (await (await client.get(f"/tasks/{task_id}")).json())["state"] == "failed"
    # From the dashboard's own origin, it retries.
    response = await client.post(f"/tasks/{task_id}/retry", headers=same)
    assert response.status == 200
    # localhost is the same machine as 127.0.0.1.
    alias = {"Origin": f"http://localhost:{client.port}"}
    assert (await client.post("/tasks", json={"data": 1}, headers=alias)).status == 202


async def test_bearer_writes_need_no_origin(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    headers = {**bearer(ADMIN_TOKEN), "Origin": "https://ci.example"}
    assert (await client.post("/tasks", json={"data": 1}, headers=headers)).status == 202


async def test_an_open_server_refuses_writes_from_other_sites(
    make_client: ClientFactory,
) -> None:
    client = await make_client(fail_task)
    response = await client.post("/tasks", json={"data": 1})  # curl, scripts: no Origin
    assert response.status == 202
    task_id = (await response.json())["id"]
    assert (await ended(client, task_id, {}))["state"] == "failed"
    form = {"Origin": "https://evil.example", "Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post(f"/tasks/{task_id}/retry", data="x=1", headers=form)
    assert response.status == 403
    assert (await (await client.get(f"/tasks/{task_id}")).json())["state"] == "failed"


async def test_base_url_is_the_origin_when_set(make_client: ClientFactory) -> None:
    client = await secured(make_client, base_url="https://tasks.example.com/")
    assert (await login(client, ADMIN_TOKEN)).status == 403  # 127.0.0.1 is not base_url
    response = await client.post(
        "/session", json={"token": ADMIN_TOKEN}, headers={"Origin": "https://tasks.example.com"}
    )
    assert response.status == 200
    assert "Secure" in response.headers["Set-Cookie"]  # base_url is https


# --- privacy ------------------------------------------------------------------------------------


def mercure_token(subscribe: list[str]) -> str:
    return jwt.encode({"mercure": {"subscribe": subscribe}}, MERCURE_KEY, algorithm="HS256")


async def test_private_tasks_are_private_on_every_route(make_client: ClientFactory) -> None:
    client = await make_client(mercure_private_tasks=True, mercure_publisher_jwt_key=MERCURE_KEY)
    server = client.app[TASKSERVER]
    first = (await (await client.post("/tasks", json={"data": "secret 1"})).json())["id"]
    second = (await (await client.post("/tasks", json={"data": "secret 2"})).json())["id"]
    for path in ("/tasks", f"/tasks/{first}", f"/tasks/{first}/events", "/events", "/stats"):
        response = await client.get(path)
        assert response.status == 401, path
        assert "secret" not in await response.text()
    assert (await client.delete(f"/tasks/{first}")).status == 401
    # A subscriber token allowed the first task's topic reads that task, and only it.
    allowed = bearer(mercure_token([server.topic(first)]))
    response = await client.get(f"/tasks/{first}", headers=allowed)
    assert response.status == 200
    assert (await response.json())["data"] == "secret 1"
    async with client.get(f"/tasks/{first}/events", headers=allowed) as stream:
        events = await sse(stream).collect()
        assert events[-1].event == "finished"
    for path in (f"/tasks/{second}", f"/tasks/{second}/events", "/tasks", "/events"):
        assert (await client.get(path, headers=allowed)).status == 403, path
    # Browsers: the Mercure cookie, as the hub reads it.
    cookie = {"mercureAuthorization": mercure_token([server.topic(second)])}
    response = await client.get(f"/tasks/{second}", cookies=cookie)
    assert response.status == 200
    assert (await client.get(f"/tasks/{first}", cookies=cookie)).status == 403


async def test_private_tasks_with_api_tokens(make_client: ClientFactory) -> None:
    client = await secured(
        make_client, mercure_private_tasks=True, mercure_publisher_jwt_key=MERCURE_KEY
    )
    server = client.app[TASKSERVER]
    response = await client.post("/tasks", json={"data": "x"}, headers=bearer(ENQUEUER))
    task_id = (await response.json())["id"]
    assert (await client.get(f"/tasks/{task_id}", headers=bearer(READER))).status == 200
    allowed = bearer(mercure_token([server.topic(0).removesuffix("0") + "{id}"]))
    assert (await client.get(f"/tasks/{task_id}", headers=allowed)).status == 200
    assert (await client.get(f"/tasks/{task_id}", headers=bearer(ENQUEUER))).status == 403


# --- the discovery Link ----------------------------------------------------------------------


async def test_a_forged_host_is_not_reflected(make_client: ClientFactory) -> None:
    client = await make_client()
    for method, path in (("GET", "/healthz"), ("GET", "/tasks"), ("OPTIONS", HUB)):
        response = await client.request(method, path, headers={"Host": "evil.example"})
        links = response.headers.getall("Link")
        assert all("evil.example" not in link for link in links), links
        assert f'<{origin_of(client)}/.well-known/mercure>; rel="mercure"' in links
    client = await make_client(base_url="https://tasks.example.com")
    response = await client.get("/healthz", headers={"Host": "evil.example"})
    assert (
        response.headers["Link"] == '<https://tasks.example.com/.well-known/mercure>; rel="mercure"'
    )


async def test_refusals_are_problems_with_the_link_and_enqueue_nothing(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    """The access check runs inside the route's guard (one frame, ``problems.guard(admit=)``):
    each way of refusing ``POST /tasks`` is a problem+json with the discovery Link, before
    the handler reads the body or appends anything."""
    link = '/.well-known/mercure>; rel="mercure"'
    secured_client = await secured(make_client)
    refusals = [
        (secured_client, {}, 401),  # no credential
        (secured_client, bearer("not-a-token-0123456789abcdef"), 401),
        (secured_client, bearer(READER), 403),  # no enqueue scope
    ]
    open_client = await make_client(db=str(tmp_path / "open.db"))
    refusals += [
        (open_client, {"Host": "evil.example"}, 421),  # DNS rebinding
        (open_client, {"Origin": "https://evil.example"}, 403),  # another site's write
    ]
    for client, headers, status in refusals:
        response = await client.post("/tasks", json={"data": 1}, headers=headers)
        assert response.status == status, (headers, await response.text())
        assert response.content_type == "application/problem+json"
        assert (await response.json())["status"] == status
        assert any(v.endswith(link) for v in response.headers.getall("Link")), headers
    for client, headers in ((secured_client, bearer(ADMIN_TOKEN)), (open_client, {})):
        listed = await (await client.get("/tasks", headers=headers)).json()
        assert listed["tasks"] == [], listed
        response = await client.post("/tasks", json={"data": 1}, headers=headers)
        assert response.status == 202


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"ci": {"token": "short", "scopes": ["read"]}}, "api_tokens.ci.token must be"),
        ({"ci": {"token": READER, "scopes": ["root"]}}, "unknown scope 'root'"),
        ({"ci": {"token": READER, "scopes": []}}, "api_tokens.ci.scopes must be"),
        ({"ci": {"token": READER}}, "api_tokens.ci.scopes must be"),
        ({"ci": {"scopes": ["read"]}}, "exactly one of token or sha256"),
        ({"ci": {"sha256": "abc", "scopes": ["read"]}}, "64 lowercase hex"),
        ({"ci": {"token": READER, "scopes": ["read"], "x": 1}}, "unknown key 'x'"),
        ({"ci": "token"}, "api_tokens.ci must be a table"),
        (
            {
                "a": {"token": READER, "scopes": ["read"]},
                "b": {"token": READER, "scopes": ["admin"]},
            },
            "api_tokens.b: same token as api_tokens.a",
        ),
    ],
)
def test_api_tokens_tables_are_checked(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_settings(env={}, overrides={"api_tokens": table})


def test_token_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="api_token: must be at least 16 characters"):
        load_settings(env={"TASKSERVER_API_TOKEN": "short"})
    with pytest.raises(ConfigError, match="api_tokens is a table: set it in the config file"):
        load_settings(env={"TASKSERVER_API_TOKENS": "x"})
    assert "0123" not in repr(TOKENS[0])  # neither secret nor digest in a repr
    settings = Settings(
        api_token=ADMIN_TOKEN, api_jwt_key=JWT_KEY, mercure_publisher_jwt_key=MERCURE_KEY
    )
    assert all(key not in repr(settings) for key in (ADMIN_TOKEN, JWT_KEY, MERCURE_KEY))


async def test_a_named_token_equal_to_api_token_is_refused(settings: Settings) -> None:
    server = TaskServer(
        Settings(db=settings.db, api_token=READER, api_tokens=(TOKENS[0],), task_workers=0)
    )
    with pytest.raises(ConfigError, match=r"api_tokens\.reader: same token as api_token"):
        attach(web.Application(), server)


async def test_a_login_form_body_that_is_not_utf8(make_client: ClientFactory) -> None:
    client = await secured(make_client)
    response = await client.post(
        "/session",
        data=b"token=\xff\xfe",
        headers={
            "Origin": origin_of(client),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert response.status == 422
    assert (await response.json())["field"] == "token"


async def test_an_unusable_jwt_key_stops_attach(settings: Settings) -> None:
    server = TaskServer(Settings(api_jwt_key="short", db=settings.db))
    server.on("task", noop_task)
    server.on("finish", noop_finish)
    with pytest.raises(ConfigError, match="api_jwt_key: an HS256 key needs at least 32 bytes"):
        attach(web.Application(), server)
