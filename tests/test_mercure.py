"""The Mercure hub through a real server: real publishers, real SSE subscribers, real JWTs."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from taskserver import (
    TASKSERVER,
    ConfigError,
    Settings,
    TaskContext,
    TaskServer,
    attach,
    load_settings,
)
from taskserver.push.jws import Verifier
from taskserver.push.mercure import MERCURE

from .conftest import (
    ROOT,
    ClientFactory,
    ServerProcess,
    SSEReader,
    noop_task,
    sse,
    wait_for,
)

Client = TestClient[web.Request, web.Application]

HUB = "/.well-known/mercure"
KEY = "!ChangeThisMercureHubJWTSecretKey!"
BOOK = "https://example.com/books/1"
#: The protocol's example publisher token for KEY (publish and subscribe "*", no exp).
EXAMPLE_TOKEN = (
    "eyJhbGciOiJIUzI1NiJ9.eyJtZXJjdXJlIjp7InB1Ymxpc2giOlsiKiJdLCJzdWJzY3JpYmUiOlsiKiJdfX0."
    "bVXdlWXwfw9ySx7-iV5OpUSHo34RkjUdVzDLBcc6l_g"
)


def token(
    publish: Sequence[str] | None = None,
    subscribe: Sequence[str] | None = None,
    *,
    key: Any = KEY,
    alg: str = "HS256",
    claim: str = "mercure",
    payload: Any = None,
    **extra: Any,
) -> str:
    """A signed token with a ``mercure`` claim holding the given selectors."""
    mercure: dict[str, Any] = {} if payload is None else {"payload": payload}
    if publish is not None:
        mercure["publish"] = list(publish)
    if subscribe is not None:
        mercure["subscribe"] = list(subscribe)
    return jwt.encode({claim: mercure, **extra}, key, algorithm=alg)


PUBLISHER = token(["*"])


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def hub_client(
    make_client: ClientFactory, task: Callable[..., Any] = noop_task, **overrides: Any
) -> Client:
    """A server whose hub has the dev key; anonymous subscribers allowed unless overridden."""
    values: dict[str, Any] = {"mercure_publisher_jwt_key": KEY, "mercure_anonymous": True}
    return await make_client(task, **{**values, **overrides})


def forged_hs256(secret: bytes, claims: dict[str, Any]) -> str:
    """An HS256 token signed by hand (PyJWT refuses to use a PEM key as an HMAC secret)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = orjson.dumps({"alg": "HS256", "typ": "JWT"})
    signing_input = f"{b64(header)}.{b64(orjson.dumps(claims))}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def publish(
    client: Client,
    topics: str | Sequence[str] = BOOK,
    *,
    auth: str | None = PUBLISHER,
    headers: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    **more_fields: str,
) -> aiohttp.ClientResponse:
    """POST an update: ``topics``, then the form ``fields`` (id, data, private, type, retry)."""
    form = [("topic", t) for t in ([topics] if isinstance(topics, str) else topics)]
    form += [*(fields or {}).items(), *more_fields.items()]
    all_headers = {**(bearer(auth) if auth else {}), **(headers or {})}
    return await client.post(HUB, data=form, headers=all_headers)


async def published(client: Client, topics: str | Sequence[str] = BOOK, **fields: str) -> str:
    """Publish and return the id the hub answered."""
    response = await publish(client, topics, fields=fields)
    assert response.status == 200, await response.text()
    return await response.text()


@asynccontextmanager
async def subscribed(
    client: Client,
    *topics: str,
    headers: dict[str, str] | None = None,
    **params: str,
) -> AsyncIterator[tuple[SSEReader, aiohttp.ClientResponse]]:
    """An open subscription (registered once the headers are in)."""
    query = [("topic", t) for t in topics or (BOOK,)] + list(params.items())
    async with client.get(HUB, params=query, headers=headers) as response:
        yield sse(response), response


# --- subscribe -------------------------------------------------------------------------


async def test_subscribe_answers_the_stream_headers_and_a_comment_at_once(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client)
    async with client.get(HUB, params={"topic": BOOK}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == (
            "private, no-cache, no-store, must-revalidate, max-age=0"
        )
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Last-Event-ID" not in response.headers
        assert await response.content.readline() == b":\n"


async def test_subscribe_without_a_topic_is_400(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await client.get(HUB)
    assert response.status == 400
    assert response.content_type == "application/problem+json"
    assert (await response.json())["detail"] == 'Missing "topic" parameter.'


async def test_too_ambiguous_a_template_is_400(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await client.get(HUB, params={"topic": "https://example.com/{a}-{b}-{c}"})
    assert response.status == 400


async def test_heartbeats_are_comments(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, heartbeat=0.05)
    async with client.get(HUB, params={"topic": BOOK}) as response:
        assert await response.content.readline() == b":\n"
        lines = []
        while b": ping\r\n" not in lines:
            lines.append(await asyncio.wait_for(response.content.readline(), 5))


async def test_subscribers_are_bounded(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, max_subscribers=1)
    async with subscribed(client):
        response = await client.get(HUB, params={"topic": BOOK})
        assert response.status == 503
        assert response.headers["Retry-After"]


# --- publish ---------------------------------------------------------------------------


async def test_publish_answers_the_id_once_durable_and_subscribers_get_every_field(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client)
    async with subscribed(client) as (reader, _):
        response = await publish(
            client, BOOK, id="urn:uuid:1", data="line 1\nline 2\r\nline 3", type="book", retry="7"
        )
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == "urn:uuid:1"
        store = client.app[TASKSERVER].store
        assert await store.find_event("urn:uuid:1") is not None  # durable before the 200
        event = await reader.next()
    assert event is not None
    assert (event.id, event.event, event.retry) == ("urn:uuid:1", "book", 7)
    assert event.data == "line 1\nline 2\nline 3"


async def test_generated_ids_are_uuid7_urns(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    async with subscribed(client) as (reader, _):
        first = await published(client, data="a")
        second = await published(client, data="b")
        events = await reader.collect(2)
    for uid in (first, second):
        assert uid.startswith("urn:uuid:")
        assert uuid.UUID(uid.removeprefix("urn:uuid:")).version == 7
    assert [e.id for e in events] == [first, second]
    assert first != second


async def test_alternate_topics_reach_their_subscribers(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    async with subscribed(client, "https://example.com/alternate") as (reader, _):
        uid = await published(client, [BOOK, "https://example.com/alternate"], data="x")
        event = await reader.next()
    assert event is not None
    assert event.id == uid


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"id": "urn:a\nretry: 1"}, 400),
        ({"id": "urn:a\rb"}, 400),
        ({"id": "#fragment"}, 400),
        ({"id": "42"}, 400),
        ({"id": "earliest"}, 400),
        ({"type": "a\nid: 3"}, 400),
        ({"retry": "soon"}, 400),
        ({"retry": "-1"}, 400),
    ],
)
async def test_bad_updates_are_400(
    make_client: ClientFactory, fields: dict[str, str], status: int
) -> None:
    client = await hub_client(make_client)
    response = await publish(client, BOOK, fields=fields)
    assert response.status == status, await response.text()


async def test_publish_needs_a_topic_and_a_form(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await client.post(HUB, data={"data": "x"}, headers=bearer(PUBLISHER))
    assert response.status == 400
    response = await client.post(HUB, json={"topic": BOOK}, headers=bearer(PUBLISHER))
    assert response.status == 415


async def test_a_reused_id_is_published_again(make_client: ClientFactory) -> None:
    # As the reference hub does (test_regressions covers live delivery and replay).
    client = await hub_client(make_client)
    assert await published(client, id="urn:uuid:dup", data="first") == "urn:uuid:dup"
    responses = await asyncio.gather(
        *(publish(client, id="urn:uuid:dup", data="again") for _ in range(3)),
        publish(client, id="urn:uuid:other", data="other"),
    )
    assert [r.status for r in responses] == [200, 200, 200, 200]


# --- publisher authorization -------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "status"),
    [
        (None, 401),
        ("not-a-token", 401),
        (token(["*"], key="another key, long enough for HS256"), 401),
        (token(["*"], exp=int(time.time()) - 10), 401),
        (token(["*"], key=None, alg="none"), 401),
        (token(None, ["*"]), 403),  # a subscriber's token
        (token([]), 403),
        (token(["https://example.com/authors/{id}"]), 403),
        (token(["https://example.com/books/{id}"]), 200),
        (token([BOOK], claim="https://mercure.rocks/"), 200),
        (EXAMPLE_TOKEN, 200),
    ],
)
async def test_publisher_authorization(
    make_client: ClientFactory, auth: str | None, status: int
) -> None:
    client = await hub_client(make_client)
    response = await publish(client, BOOK, auth=auth, data="x")
    assert response.status == status, await response.text()
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_every_topic_of_an_update_needs_publish_rights(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await publish(
        client, [BOOK, "https://example.com/secret"], auth=token([BOOK]), data="x"
    )
    assert response.status == 403
    assert await client.app[TASKSERVER].store.find_event("anything") is None


async def test_the_header_is_malformed_without_bearer(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    response = await client.post(
        HUB, data={"topic": BOOK}, headers={"Authorization": f"Basic {PUBLISHER}"}
    )
    assert response.status == 401


async def test_cookie_publishing_only_from_allowed_origins(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, mercure_publish_origins="https://app.example.com")
    cookie = {"Cookie": f"mercureAuthorization={PUBLISHER}"}
    cases = [
        ({}, 403),  # neither Origin nor Referer
        ({"Origin": "https://evil.example.com"}, 403),
        ({"Referer": "https://evil.example.com/page"}, 403),
        ({"Origin": "https://app.example.com"}, 200),
        ({"Referer": "https://app.example.com/some/page?x=1"}, 200),
    ]
    for headers, status in cases:
        response = await publish(client, auth=None, headers={**cookie, **headers}, data="x")
        assert response.status == status, (headers, await response.text())


async def test_the_cookie_name_is_configurable(make_client: ClientFactory) -> None:
    client = await hub_client(
        make_client, mercure_cookie_name="hubToken", mercure_publish_origins="*"
    )
    headers = {"Cookie": f"hubToken={PUBLISHER}", "Origin": "https://anywhere.example"}
    response = await publish(client, auth=None, headers=headers, data="x")
    assert response.status == 200


async def test_rs256_keys_from_a_pem_file(make_client: ClientFactory, tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "public.pem").write_bytes(pem)
    client = await hub_client(
        make_client,
        mercure_jwt_alg="RS256",
        mercure_publisher_jwt_key=str(tmp_path / "public.pem"),
    )
    response = await publish(client, auth=token(["*"], key=private, alg="RS256"), data="x")
    assert response.status == 200
    # HS256 "signed" with the public key text (algorithm confusion) is refused.
    forged = forged_hs256(pem, {"mercure": {"publish": ["*"]}})
    response = await publish(client, auth=forged, data="x")
    assert response.status == 401


# --- subscriber authorization -------------------------------------------------------------


async def test_subscriber_authorization(make_client: ClientFactory) -> None:
    closed = await hub_client(make_client, mercure_anonymous=False)
    assert (await closed.get(HUB, params={"topic": BOOK})).status == 401
    for bad in (
        "garbage",
        token(None, ["*"], exp=int(time.time()) - 10),
        token(None, ["*"], key="x" * 40),
    ):
        response = await closed.get(HUB, params={"topic": BOOK}, headers=bearer(bad))
        assert response.status == 401, bad
    async with subscribed(closed, headers=bearer(token(None, [BOOK]))):
        pass
    # With anonymous access on, an invalid token is still refused.
    opened = await hub_client(make_client)
    response = await opened.get(HUB, params={"topic": BOOK}, headers=bearer("garbage"))
    assert response.status == 401


async def test_private_updates_reach_only_authorized_subscribers(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client)
    authorized = bearer(token(None, ["https://example.com/books/{id}"]))
    other = bearer(token(None, ["https://example.com/authors/{id}"]))
    async with (
        subscribed(client) as (anonymous, _),
        subscribed(client, headers=authorized) as (allowed, _),
        subscribed(client, headers=other) as (unrelated, _),
    ):
        secret = await published(client, data="secret", private="on")
        public = await published(client, data="public")
        assert [e.id for e in await allowed.collect(2)] == [secret, public]
        # Events arrive in order: the first one the others see is the public one.
        assert [e.data for e in await anonymous.collect(1)] == ["public"]
        assert [e.data for e in await unrelated.collect(1)] == ["public"]


async def test_token_precedence_header_then_query_then_cookie(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client, mercure_anonymous=False)
    good, bad = token(None, ["*"]), "garbage"

    async def status(
        header: str | None = None, query: str | None = None, cookie: str | None = None
    ) -> int:
        headers = bearer(header) if header else {}
        if cookie:
            headers["Cookie"] = f"mercureAuthorization={cookie}"
        params = {"topic": BOOK, **({"authorization": query} if query else {})}
        async with client.get(HUB, params=params, headers=headers) as response:
            return response.status

    assert await status(header=good, query=bad, cookie=bad) == 200
    assert await status(header=bad, query=good, cookie=good) == 401
    assert await status(query=good, cookie=bad) == 200
    assert await status(query=bad, cookie=good) == 401
    assert await status(cookie=good) == 200
    assert await status(cookie=bad) == 401


async def test_a_query_parameter_token_unlocks_private_updates(
    make_client: ClientFactory,
) -> None:
    client = await hub_client(make_client)
    async with subscribed(client, authorization=token(None, [BOOK])) as (reader, _):
        uid = await published(client, data="secret", private="")
        event = await reader.next()
    assert event is not None
    assert event.id == uid


@pytest.mark.parametrize("fraction", [0.0, 0.9])
async def test_the_stream_closes_when_the_token_expires(
    make_client: ClientFactory, fraction: float
) -> None:
    # PyJWT compares int(exp) with the clock, so a token with a fractional exp is refused
    # from the whole second before it; the stream must end then too, not at exp itself.
    # A whole second from now gives the subscribe 1-2 s to arrive, even on a slow machine.
    client = await hub_client(make_client, heartbeat=60.0)
    refused_from = int(time.time()) + 2
    signed = token(None, [BOOK], exp=refused_from + fraction)
    assert Verifier(KEY, "HS256").verify(signed).expires == refused_from
    headers = bearer(signed)
    async with subscribed(client, headers=headers) as (reader, _):
        assert await reader.collect(timeout=10) == []  # returns at the end of the stream
        ended = time.time()
    assert refused_from - 0.05 <= ended < refused_from + 0.8  # not at exp (+ 0.9)
    async with client.get(HUB, params={"topic": BOOK}, headers=headers) as response:
        assert response.status == 401


# --- templates ------------------------------------------------------------------------------


async def test_template_selectors(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    async with subscribed(client, "https://example.com/books/{id}") as (reader, _):
        await published(client, "https://example.com/books/1/reviews", data="not this")
        await published(client, "https://example.com/authors/1", data="nor this")
        wanted = await published(client, "https://example.com/books/2", data="this")
        event = await reader.next()
    assert event is not None
    assert event.id == wanted


async def test_star_receives_everything(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    async with subscribed(client, "*") as (reader, _):
        ids = [await published(client, t) for t in ("urn:a", "https://b.example/x")]
        assert [e.id for e in await reader.collect(2)] == ids


# --- history ---------------------------------------------------------------------------------


async def test_reconnection_replays_after_last_event_id(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    other = await published(client, "https://example.com/other", data="other topic")
    ids = [await published(client, data=str(n)) for n in range(3)]
    del other

    async def replay(
        count: int, headers: dict[str, str] | None = None, **params: str
    ) -> tuple[str, list[str]]:
        async with subscribed(client, headers=headers, **params) as (reader, response):
            events = await reader.collect(count)
            return response.headers["Last-Event-ID"], [e.id or "" for e in events]

    assert await replay(1, {"Last-Event-ID": ids[1]}) == (ids[1], ids[2:])
    assert await replay(1, lastEventID=ids[1]) == (ids[1], ids[2:])
    # The header wins over the query parameter.
    assert await replay(1, {"Last-Event-ID": ids[1]}, lastEventID=ids[0]) == (ids[1], ids[2:])
    assert await replay(3, lastEventID="earliest") == ("earliest", ids)
    # An unknown id replays the history too, and says so.
    assert await replay(3, lastEventID="urn:uuid:unknown") == ("earliest", ids)


async def test_replay_respects_private_rights(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    await published(client, data="secret", private="on")
    public = await published(client, data="public")
    async with subscribed(client, lastEventID="earliest") as (reader, _):
        assert [e.id for e in await reader.collect(1)] == [public]
    headers = bearer(token(None, [BOOK]))
    async with subscribed(client, headers=headers, lastEventID="earliest") as (reader, _):
        assert [e.data for e in await reader.collect(2)] == ["secret", "public"]


async def test_replay_then_live_without_gap_or_duplicate(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    first = await published(client, data="1")
    stored = await published(client, data="2")
    async with subscribed(client, lastEventID=first) as (reader, _):
        live = await published(client, data="3")
        assert [e.id for e in await reader.collect(2)] == [stored, live]


# --- task events -------------------------------------------------------------------------------


async def test_a_tasks_events_arrive_on_its_topic(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    server = client.app[TASKSERVER]
    template = server.topic(0).removesuffix("0") + "{id}"
    async with subscribed(client, template) as (reader, _):
        response = await client.post("/tasks", json={"data": {"n": 1}})
        task_id = (await response.json())["id"]
        events = await reader.collect(3)
    payloads = [orjson.loads(e.data) for e in events]
    assert [p["type"] for p in payloads] == ["queued", "started", "finished"]
    assert {p["task_id"] for p in payloads} == {task_id}
    # Unnamed (so `onmessage` gets them), with the sequence number as id.
    assert all(e.event is None and e.id is not None and e.id.isdigit() for e in events)
    # Reconnecting after the first replays the rest, on the exact topic.
    async with subscribed(client, server.topic(task_id), lastEventID=events[0].id or "") as (
        reader,
        response,
    ):
        assert response.headers["Last-Event-ID"] == events[0].id
        assert [e.id for e in await reader.collect(2)] == [e.id for e in events[1:]]


async def test_private_task_events_need_rights(make_client: ClientFactory) -> None:
    release = asyncio.Event()

    async def held(ctx: TaskContext) -> Any:
        await release.wait()
        return None

    client = await hub_client(make_client, held, mercure_private_tasks=True)
    server = client.app[TASKSERVER]
    response = await client.post("/tasks", json={"data": None})
    topic = server.topic((await response.json())["id"])
    rights = bearer(token(None, [topic]))
    async with (
        subscribed(client, topic, lastEventID="earliest") as (anonymous, _),
        subscribed(client, topic, headers=rights, lastEventID="earliest") as (allowed, _),
    ):
        release.set()
        types = [orjson.loads(e.data)["type"] for e in await allowed.collect(3)]
        assert types == ["queued", "started", "finished"]
        marker = await published(client, topic, data="public marker")
        assert [e.id for e in await anonymous.collect(1)] == [marker]


# --- CORS and discovery ------------------------------------------------------------------------


async def test_cors_allow_list_and_preflight(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, mercure_cors_origins="https://app.example.com")
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "last-event-id",
    }
    response = await client.options(HUB, headers=preflight)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert "last-event-id" in response.headers["Access-Control-Allow-Headers"]
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    response = await client.options(HUB, headers={**preflight, "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in response.headers
    async with client.get(
        HUB, params={"topic": BOOK}, headers={"Origin": "https://app.example.com"}
    ) as stream:
        assert stream.headers["Access-Control-Allow-Origin"] == "https://app.example.com"


async def test_cors_star_never_allows_credentials(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, mercure_cors_origins="*")
    async with client.get(
        HUB, params={"topic": BOOK}, headers={"Origin": "https://any.example"}
    ) as stream:
        assert stream.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in stream.headers


async def test_discovery_links(make_client: ClientFactory) -> None:
    client = await hub_client(make_client, task_workers=0)
    response = await client.post("/tasks", json={"data": 1})
    task_id = (await response.json())["id"]
    hub = f'<http://{client.host}:{client.port}{HUB}>; rel="mercure"'
    assert hub in response.headers.getall("Link")
    response = await client.get(f"/tasks/{task_id}")
    links = response.headers.getall("Link")
    assert hub in links
    assert f'<{client.app[TASKSERVER].topic(task_id)}>; rel="self"' in links
    based = await hub_client(make_client, base_url="https://tasks.example.com/")
    response = await based.get("/healthz")
    assert '<https://tasks.example.com/.well-known/mercure>; rel="mercure"' in (
        response.headers.getall("Link")
    )


# --- subscriptions API -------------------------------------------------------------------------


async def test_subscriptions_api(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    api = "/.well-known/mercure/subscriptions"
    reader_token = token(None, [api + "{/topic,subscriber}"])
    # A JWT's JSON may hold an integer past 64 bits: listed as it came.
    subscriber = token(None, [BOOK], payload={"user": "alice", "n": 2**70})
    async with subscribed(client, BOOK, "*", headers=bearer(subscriber)):
        response = await client.get(api, headers=bearer(reader_token))
        assert response.status == 200
        assert response.content_type == "application/ld+json"
        body = await response.json()
        assert body["@context"] == "https://mercure.rocks/"
        assert (body["id"], body["type"]) == (api, "Subscriptions")
        assert body["lastEventID"] == "earliest"
        docs = body["subscriptions"]
        assert {d["topic"] for d in docs} == {BOOK, "*"}
        assert all(d["active"] and d["payload"] == {"user": "alice", "n": 2**70} for d in docs)
        doc = next(d for d in docs if d["topic"] == BOOK)
        everything = bearer(token(None, ["*"]))
        response = await client.get(f"{api}/{quote(BOOK, safe='')}", headers=everything)
        by_topic = await response.json()
        assert [d["id"] for d in by_topic["subscriptions"]] == [doc["id"]]
        single = await client.get(doc["id"], headers=everything)
        assert single.status == 200
        assert (await single.json())["subscriber"] == doc["subscriber"]
        uid = await published(client, data="x")
        body = await (await client.get(api, headers=bearer(reader_token))).json()
        assert body["lastEventID"] == uid
    # The server notices the client left at its next heartbeat.
    await wait_for(lambda: not client.app[MERCURE].connections, message="the connection released")
    missing = await client.get(doc["id"], headers=everything)
    assert missing.status == 404
    assert (await client.get(api)).status == 401
    assert (await client.get(api, headers=bearer(token(None, [BOOK])))).status == 403


async def test_hub_state_is_visible(make_client: ClientFactory) -> None:
    client = await hub_client(make_client)
    hub = client.app[MERCURE]
    async with subscribed(client):
        await wait_for(lambda: len(hub.connections) == 1, message="one connection")
        assert "subscribers=1" in repr(hub)
    await wait_for(lambda: not hub.connections, message="the connection released")


# --- configuration ------------------------------------------------------------------------------


def test_boolean_settings_from_env_toml_and_cli(tmp_path: Path) -> None:
    env = {"TASKSERVER_MERCURE_ANONYMOUS": "Yes", "TASKSERVER_MERCURE_PRIVATE_TASKS": "0"}
    settings = load_settings(env=env)
    assert (settings.mercure_anonymous, settings.mercure_private_tasks) == (True, False)
    (tmp_path / "hub.toml").write_text("mercure_anonymous = true\n")
    assert load_settings(config_file=tmp_path / "hub.toml", env={}).mercure_anonymous is True
    overrides = {"mercure_anonymous": "false"}
    assert load_settings(env={}, overrides=overrides).mercure_anonymous is False
    with pytest.raises(ConfigError, match="mercure_anonymous: expected bool"):
        load_settings(env={"TASKSERVER_MERCURE_ANONYMOUS": "maybe"})
    (tmp_path / "bad.toml").write_text("mercure_anonymous = 1\n")
    with pytest.raises(ConfigError, match="expected bool"):
        load_settings(config_file=tmp_path / "bad.toml", env={})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mercure_publisher_jwt_key": "!ChangeMe!"}, "at least 32 bytes"),
        ({"mercure_subscriber_jwt_key": "short"}, "mercure_subscriber_jwt_key"),
        ({"mercure_jwt_alg": "RS256", "mercure_publisher_jwt_key": "/nonexistent.pem"}, "PEM"),
        ({"mercure_jwt_alg": "RS256", "mercure_publisher_jwt_key": "-----BEGIN x"}, "PEM"),
        ({"mercure_cors_origins": "example.com"}, "mercure_cors_origins"),
        ({"mercure_publish_origins": "https://a.example/path"}, "mercure_publish_origins"),
    ],
)
def test_unusable_hub_settings_fail_before_serving(
    settings: Settings, overrides: dict[str, str], message: str
) -> None:
    server = TaskServer(
        Settings(**{**dataclasses.asdict(settings), "task_workers": 0, **overrides})
    )
    with pytest.raises(ConfigError, match=message):
        attach(web.Application(), server)


async def test_the_dev_configuration_end_to_end(run_server: Callable[..., ServerProcess]) -> None:
    server = run_server("--config", str(ROOT / "config" / "mercure-dev.toml"))
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{server.url}/tasks", json={"data": {"to": "a"}})
        created = await response.json()
        assert f'<{server.url}{HUB}>; rel="mercure"' in response.headers.getall("Link")
        params = {"topic": created["topic"], "lastEventID": "earliest"}
        async with session.get(f"{server.url}{HUB}", params=params) as stream:
            reader = sse(stream)
            types: list[str] = []
            while not types or types[-1] not in ("finished", "failed"):
                event = await reader.next()
                assert event is not None
                types.append(orjson.loads(event.data)["type"])
            assert types[:2] == ["queued", "started"]
            assert types[-1] == "finished"
            form = {"topic": created["topic"], "data": "from the example token"}
            response = await session.post(
                f"{server.url}{HUB}", data=form, headers=bearer(EXAMPLE_TOKEN)
            )
            assert response.status == 200
            published = await reader.next()
            assert published is not None
            assert (published.id, published.data) == (
                await response.text(),
                "from the example token",
            )
