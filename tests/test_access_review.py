"""Findings of the issue-10 security review (REVIEW10.md): each reproduced on a real server.

Raw sockets where a client library would refuse to send the bytes (non-UTF-8 headers).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from taskserver import TASKSERVER, ConfigError, Settings, TaskServer, attach, load_settings
from taskserver.push.jws import load_key

from .conftest import ROOT, ClientFactory, ServerProcess, sse, wait_for
from .test_access_cli import _one_line, _run

Client = TestClient[web.Request, web.Application]

ADMIN = "admin-token-0123456789abcdef"
JWT_KEY = "a-jwt-secret-of-at-least-32-bytes!!"
MERCURE_KEY = "!ChangeThisMercureHubJWTSecretKey!"
HUB = "/.well-known/mercure"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

pytestmark = pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def raw(port: int | None, head: bytes) -> bytes:
    """Send ``head`` on a fresh connection; everything answered until the server closes."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def hs256(header: dict[str, Any], payload: dict[str, Any], key: str) -> str:
    """A JWS signed by hand: PyJWT will not encode every header an attacker can."""

    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    signing = part(json.dumps(header).encode()) + "." + part(json.dumps(payload).encode())
    signature = hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + part(signature)


# --- 2: credentials that are not UTF-8 ----------------------------------------------------


async def test_credentials_that_are_not_utf8_are_401(make_client: ClientFactory) -> None:
    client = await make_client(
        api_token=ADMIN, api_jwt_key=JWT_KEY, mercure_publisher_jwt_key=MERCURE_KEY
    )
    heads = [
        b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfeabc\r\n",
        b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer a.\xff.c\r\n",
        b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: taskserver_token=\xff\xfe\r\n",
        b"GET " + HUB.encode() + b"?topic=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer a.\xff.c\r\n",
        b"GET " + HUB.encode() + b"?topic=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Cookie: mercureAuthorization=a.\xff.c\r\n",
        b"GET /tasks/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: mercureAuthorization=a.\xff.c\r\n",
    ]
    for head in heads:
        answer = await raw(client.port, head + b"Connection: close\r\n\r\n")
        assert status_of(answer) == 401, (head, answer[:300])


# --- 3: nothing of the token in WWW-Authenticate -----------------------------------------------


async def test_www_authenticate_carries_no_text_of_the_token(make_client: ClientFactory) -> None:
    client = await make_client(api_jwt_key=JWT_KEY, mercure_publisher_jwt_key=MERCURE_KEY)
    payload = {"taskserver": {"scopes": ["read"]}}
    injected = hs256({"alg": "HS256", "crit": ["x\r\nSet-Cookie: owned=1"]}, payload, JWT_KEY)
    quoted = hs256({"alg": "HS256", "crit": ['"evil"']}, payload, JWT_KEY)
    for token in (injected, quoted):
        head = (
            f"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n"
        )
        answer = await raw(client.port, head.encode())
        assert status_of(answer) == 401, answer[:300]
        head_part = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert "owned" not in head_part, head_part
        assert "evil" not in head_part, head_part
        challenge = next(
            line for line in head_part.split("\r\n") if line.startswith("WWW-Authenticate:")
        )
        assert challenge == (
            'WWW-Authenticate: Bearer realm="taskserver", error="invalid_token", '
            'error_description="the token is not valid"'
        ), challenge
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert not CONTROL.search(body["detail"]), body  # the detail, without control characters


# --- 4: task events on the hub are private once the API has credentials --------------------------


async def test_hub_task_events_need_the_topic_once_the_api_needs_a_token(
    make_client: ClientFactory,
) -> None:
    client = await make_client(
        api_token=ADMIN, mercure_publisher_jwt_key=MERCURE_KEY, mercure_anonymous=True
    )
    server = client.app[TASKSERVER]
    other = jwt.encode({"mercure": {"subscribe": ["https://example.com/other"]}}, MERCURE_KEY)
    everything = jwt.encode({"mercure": {"subscribe": ["*"]}}, MERCURE_KEY)
    publisher = jwt.encode({"mercure": {"publish": ["*"]}}, MERCURE_KEY)
    url = f"{HUB}?topic=*"
    async with (
        client.get(url) as anonymous,
        client.get(url, headers=bearer(other)) as unrelated,
        client.get(url, headers=bearer(everything)) as allowed,
    ):
        readers = [sse(anonymous), sse(unrelated), sse(allowed)]
        response = await client.post("/tasks", json={"data": "secret"}, headers=bearer(ADMIN))
        task_id = (await response.json())["id"]

        async def ended() -> bool:
            task = await server.get(task_id)
            return task.state.value == "succeeded"

        await wait_for(ended, message="the task to end")
        # A public update after the task's events: every subscriber gets it, in order.
        done = await client.post(
            HUB, data={"topic": "urn:marker", "data": "marker"}, headers=bearer(publisher)
        )
        assert done.status == 200
        seen = []
        for reader in readers:
            events = []
            while (event := await reader.next()) is not None and event.data != "marker":
                events.append(event.data)
            seen.append(events)
    anonymous_seen, unrelated_seen, allowed_seen = seen
    assert anonymous_seen == [], seen
    assert unrelated_seen == [], seen
    assert any("secret" in data for data in allowed_seen), allowed_seen


def test_an_anonymous_hub_with_public_task_events_on_a_public_address_refuses_to_start(
    tmp_path: Path,
) -> None:
    line = _one_line(
        _run(
            tmp_path,
            "--host",
            "0.0.0.0",
            "--mercure-publisher-jwt-key",
            MERCURE_KEY,
            "--mercure-anonymous",
            "true",
        )
    )
    assert "insecure_no_auth" in line, line
    assert "mercure_anonymous" in line, line


# --- 5: DNS rebinding on an open loopback server --------------------------------------------------


async def test_an_open_server_answers_only_loopback_host_names(make_client: ClientFactory) -> None:
    client = await make_client()
    port = client.port
    refused = ["evil.example", f"evil.example:{port}", "10.0.0.1", "localhost.evil.example"]
    accepted = [
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        "LOCALHOST",
        "127.1.2.3",
        f"[::1]:{port}",
        "[::1]",
    ]
    for host in refused:
        for method, path in (("GET", "/tasks"), ("DELETE", "/tasks/1"), ("GET", HUB + "?topic=*")):
            response = await client.request(method, path, headers={"Host": host})
            assert response.status == 421, (host, method, path, response.status)
            assert response.content_type == "application/problem+json"
            assert "base_url" in (await response.json())["detail"]
    for host in accepted:
        response = await client.get("/tasks", headers={"Host": host})
        assert response.status == 200, (host, response.status)
    client = await make_client(base_url="https://tasks.example.com")
    response = await client.get("/tasks", headers={"Host": "tasks.example.com"})
    assert response.status == 200
    assert (await client.get("/tasks", headers={"Host": "evil.example"})).status == 421
    # With a credential any Host is answered: the token is what protects it.
    client = await make_client(api_token=ADMIN)
    response = await client.get("/tasks", headers={"Host": "evil.example", **bearer(ADMIN)})
    assert response.status == 200


# --- 6: the README's example digest -------------------------------------------------------------


def test_the_readme_example_digest_is_a_marked_placeholder() -> None:
    readme = (ROOT / "README.md").read_text()
    digests = re.findall(r'sha256 = "([0-9a-f]{64})"', readme)
    assert digests
    for word in ("test", "password", "secret", "token", ""):
        assert hashlib.sha256(word.encode()).hexdigest() not in digests, word
    section = readme[
        readme.index("[api_tokens.grafana]") - 600 : readme.index("[api_tokens.grafana]")
    ]
    assert "placeholder" in readme[readme.index("[api_tokens.grafana]") :][:400]
    assert "sha256sum" in section
    assert "weak" in section


# --- 7: no secret in a startup error ---------------------------------------------------------


def test_startup_errors_do_not_echo_secrets(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as short:
        load_settings(env={"TASKSERVER_API_TOKEN": "shortsecretXY"})
    assert "shortsecretXY" not in str(short.value)
    assert "got 13 characters" in str(short.value)
    config = tmp_path / "taskserver.toml"
    config.write_text("api_token = 1234567890123456789\n")
    with pytest.raises(ConfigError) as typed:
        load_settings(config_file=config, env={})
    assert "1234567" not in str(typed.value)
    assert "expected str, got int" in str(typed.value)
    secret = "not-a-pem-but-a-misplaced-secret-0123456789"
    with pytest.raises(ConfigError) as key:
        load_key(secret, "RS256", "api_jwt_key")
    assert secret not in str(key.value)
    assert "PEM" in str(key.value)
    line = _one_line(_run(tmp_path, "--api-token", "shortsecretXY"))
    assert "shortsecretXY" not in line
    assert "13 characters" in line
    line = _one_line(_run(tmp_path, "--api-jwt-alg", "RS256", "--api-jwt-key", secret))
    assert secret not in line, line


# --- 11: scopes that are not strings ------------------------------------------------------------


async def test_jwt_scopes_that_are_not_strings_are_401(make_client: ClientFactory) -> None:
    client = await make_client(api_jwt_key=JWT_KEY)
    for scopes in ([["read"]], [{"a": 1}], "admin", [1]):
        token = jwt.encode({"taskserver": {"scopes": scopes}}, JWT_KEY)
        response = await client.get("/tasks", headers=bearer(token))
        assert response.status == 401, (scopes, response.status)


# --- 12: exp and nbf must be numbers ----------------------------------------------------------


async def test_a_non_numeric_exp_or_nbf_is_401(make_client: ClientFactory) -> None:
    client = await make_client(api_jwt_key=JWT_KEY, mercure_publisher_jwt_key=MERCURE_KEY)
    later = str(int(time.time()) + 3600)
    for claim in ({"exp": later}, {"nbf": "0"}, {"exp": True}):
        hub_token = jwt.encode({"mercure": {"subscribe": ["*"]}, **claim}, MERCURE_KEY)
        async with client.get(f"{HUB}?topic=*", headers=bearer(hub_token)) as response:
            assert response.status == 401, (claim, response.status)
        api_token = jwt.encode({"taskserver": {"scopes": ["read"]}, **claim}, JWT_KEY)
        response = await client.get("/tasks", headers=bearer(api_token))
        assert response.status == 401, (claim, response.status)


# --- 13: a PEM public key given as an HS256 secret ---------------------------------------------


def _public_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


async def test_a_pem_key_for_hs256_is_refused_at_start(settings: Settings) -> None:
    pem = _public_pem()
    for field, alg in (
        ("api_jwt_key", "api_jwt_alg"),
        ("mercure_publisher_jwt_key", "mercure_jwt_alg"),
    ):
        server = TaskServer(Settings(db=settings.db, **{field: pem}))  # type: ignore[arg-type]
        server.on("task", lambda ctx: None)
        server.on("finish", lambda ctx, result: None)
        with pytest.raises(ConfigError, match=rf"{field}: .*{alg} = RS256"):
            attach(web.Application(), server)


# --- ::1: URLs with brackets ----------------------------------------------------------------------


async def test_ipv6_loopback_urls_have_brackets(run_server: Callable[..., ServerProcess]) -> None:
    import aiohttp

    server = run_server("--host", "::1", env={"TASKSERVER_API_TOKEN": ""})
    assert server.url.startswith("http://[::1]:"), server.url
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/tasks", json={"data": 1}) as response,
    ):
        assert response.status == 202, await response.text()
        body = await response.json()
    assert body["topic"].startswith(server.url + "/tasks/"), body
    assert server.terminate() == 0
