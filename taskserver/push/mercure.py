"""The built-in Mercure hub at ``/.well-known/mercure`` (protocol draft-07).

Existing Mercure clients (browser ``EventSource`` code, Symfony Mercure, API
Platform) work against it unchanged:

* ``GET`` subscribes with one or more ``topic`` selectors (``topics.py``) and
  answers a Server-Sent Events stream; ``POST`` publishes a form-encoded update,
  made durable before the ``200`` that carries its id.
* JWS authorization (``jws.py``): ``Authorization: Bearer``, else the
  ``authorization`` query parameter, else the cookie; private updates go only to
  subscribers whose ``mercure.subscribe`` selectors match one of their topics.
* History: ``Last-Event-ID`` / ``lastEventID`` / ``earliest`` replay from the
  store; task events and published updates share one sequence, so one id
  resumes both.
* Task events reach subscribers on the task's topic (``server.topic(id)``) with
  their sequence number as SSE id, and *without* an ``event:`` name, so an
  ``EventSource.onmessage`` handler sees them; the payload's ``type`` says what
  happened. ``mercure_private_tasks`` makes them private, and so does any API
  credential (``tasks_private_by_api``).
* Fan-out never blocks: subscribers with the same selectors and rights share
  one group in the ``Fanout`` (each update matched, checked and framed once for
  them all, one write per subscriber per round); a slow one is dropped and
  reconnects with ``Last-Event-ID``.
* CORS allow-list and ``Link: <hub>; rel="mercure"`` discovery on the hub's
  responses (``decorate``; the API adds the same Link, and ``rel="self"`` on a
  task), heartbeats, and the subscriptions API (``directory.py``: on a cluster it
  lists every node's subscribers). Subscription *events* are not published.

Errors are ``application/problem+json`` (``problems.guard``), as elsewhere in the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import NoReturn, Protocol
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from multidict import MultiDict
from yarl import URL

from ..config import Settings
from ..errors import ConfigError, ServerBusy
from ..models import Event
from ..problems import PROBLEM, Handler, guard, problem_body
from .directory import Directory, SharedDirectory, json_text
from .fanout import Fanout
from .jws import AuthError, Claims, Verifier, load_key
from .origins import HUB_PATH, discovery_link, public_origin
from .sse import TransportSink, open_stream
from .subscription import Subscription
from .topics import Selectors, TemplateTooComplex

SUBSCRIPTIONS_PATH = HUB_PATH + "/subscriptions"
#: The reference hub's headers, so that no proxy or browser caches a stream.
CACHE_CONTROL = "private, no-cache, no-store, must-revalidate, max-age=0"
JSON_LD = "application/ld+json"
CONTEXT = "https://mercure.rocks/"
FORM = "application/x-www-form-urlencoded"
EARLIEST = "earliest"
#: Sent with every 401 (RFC 6750).
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mercure"'}

#: Selectors per subscription request, and topics per update: every list is bounded.
MAX_SELECTORS = 100
MAX_TOPICS = 100
#: Most fields in one publish form: its topics and the five other fields, some repeated.
MAX_FIELDS = MAX_TOPICS + 20
#: Longest published topic: template matching can be quadratic in it (see topics.py).
MAX_TOPIC_LENGTH = 2048
MAX_ID_LENGTH = 1024
#: Stored events read per query while replaying history.
REPLAY_PAGE = 500
#: A write to a client that does not read for this long drops the client.
SEND_TIMEOUT = 10.0
#: Encoded events kept for reuse: one live event is encoded once for all its subscribers.
FRAME_CACHE = 64
#: How long browsers may cache a CORS preflight answer, in seconds.
CORS_MAX_AGE = "600"
CORS_ALLOW_HEADERS = "authorization, cache-control, last-event-id, content-type"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")
_STATUS_ERRORS: dict[int, type[web.HTTPException]] = {
    400: web.HTTPBadRequest,
    401: web.HTTPUnauthorized,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    409: web.HTTPConflict,
    415: web.HTTPUnsupportedMediaType,
    503: web.HTTPServiceUnavailable,
}


class HubServer(Protocol):
    """What the hub needs from ``TaskServer`` (kept narrow: the hub does not import it)."""

    settings: Settings
    fanout: Fanout[Event]

    @property
    def last_event_id(self) -> int: ...

    async def find_event(self, uid: str) -> int | None: ...

    async def follow_events(self) -> None: ...

    def publish_update(
        self,
        topics: tuple[str, ...],
        data: str,
        *,
        private: bool = ...,
        uid: str | None = ...,
        type_: str | None = ...,
        retry: int | None = ...,
    ) -> tuple[Event, asyncio.Future[None]]: ...

    def topic(self, task_id: int) -> str: ...

    async def events_after(
        self, after_id: int, *, tasks_only: bool = ..., limit: int = ...
    ) -> list[Event]: ...

    @property
    def subscribers(self) -> SharedDirectory | None: ...


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7), as the reference hub generates ids."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # variant
    return uuid.UUID(int=value)


def _fail(status: int, detail: str, *, headers: dict[str, str] | None = None) -> NoReturn:
    """Raise an ``application/problem+json`` HTTP error (``problems.guard`` passes it on)."""
    body = problem_body(status, HTTPStatus(status).phrase, detail)
    raise _STATUS_ERRORS[status](text=body.decode(), content_type=PROBLEM, headers=headers)


async def _read_form(request: web.Request) -> MultiDict[str]:
    """The urlencoded body's fields, decoded strictly as UTF-8 (400 otherwise).

    ``request.post()`` raises on raw bytes that are not UTF-8 (a 500) and turns
    bad percent-escapes into U+FFFD (the update silently altered): neither is sent.
    """
    raw = await request.read()  # client_max_size bounds it
    try:
        text = raw.decode()
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        _fail(400, "the form body is not valid UTF-8 (raw, or percent-encoded in a field)")
    except ValueError:
        _fail(400, f"at most {MAX_FIELDS} form fields per update")
    return MultiDict(pairs)


def _parse_origins(value: str, setting: str) -> frozenset[str]:
    origins = frozenset(filter(None, re.split(r"[\s,]+", value)))
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"{setting}: {origin!r} is not an origin like 'https://example.com' or '*'"
            )
    return origins


def _is_seq(value: str) -> bool:
    """Whether ``value`` reads as a sequence number (the SSE id of a task event)."""
    return value.isascii() and value.isdigit() and len(value) <= 18


@dataclass(eq=False, slots=True)
class Connection:
    """One subscriber's stream: its selectors, its rights, its queue in the hub."""

    #: The subscriber's IRI, shared by the subscriptions of this connection.
    subscriber: str
    selectors: Selectors
    claims: Claims | None
    subscription: Subscription[Event]
    expired: bool = False

    def expire(self) -> None:
        """The token's ``exp`` has come: stop sending, end the stream."""
        self.expired = True
        self.subscription.close()


class MercureHub:
    """The hub's handlers and state. Built by ``add_routes``; raises ``ConfigError`` early."""

    def __init__(self, server: HubServer) -> None:
        settings = server.settings
        self.server = server
        alg = settings.mercure_jwt_alg
        publisher_key = settings.mercure_publisher_jwt_key
        subscriber_key = settings.mercure_subscriber_jwt_key or publisher_key
        subscriber_setting = (
            "mercure_subscriber_jwt_key"
            if settings.mercure_subscriber_jwt_key
            else "mercure_publisher_jwt_key"
        )
        self.publisher = Verifier(self._key(publisher_key, alg, "mercure_publisher_jwt_key"), alg)
        self.subscriber = Verifier(self._key(subscriber_key, alg, subscriber_setting), alg)
        self.anonymous = settings.mercure_anonymous
        self.cookie_name = settings.mercure_cookie_name
        self.private_tasks = settings.mercure_private_tasks
        #: Whether the API needs a credential (set by ``access.Access``): task events are
        #: then private too, or the hub would hand out what the API refuses.
        self.tasks_private_by_api: Callable[[], bool] = lambda: False
        #: Called first on every subscribe and publish (the API's ``Host`` check).
        self.check_request: Callable[[web.Request], None] = lambda request: None
        self.cors_origins = _parse_origins(settings.mercure_cors_origins, "mercure_cors_origins")
        self.publish_origins = _parse_origins(
            settings.mercure_publish_origins, "mercure_publish_origins"
        )
        self.connections: dict[str, Connection] = {}
        #: the subscriptions API's view: these connections and, on a cluster, every node's
        self.directory = Directory(
            SUBSCRIPTIONS_PATH,
            (lambda: server.subscribers) if settings.mercure_subscriptions else lambda: None,
        )
        self._frames: dict[int, bytes] = {}
        self.published = 0

    def __repr__(self) -> str:
        return f"<Mercure subscribers={len(self.connections)} published={self.published}>"

    @staticmethod
    def _key(value: str, alg: str, setting: str) -> str | RSAPublicKey:
        return load_key(value, alg, setting) if value else ""

    # --- authorization -----------------------------------------------------------

    def _token(self, request: web.Request, *, publishing: bool) -> str | None:
        """The token, in precedence order: header, query parameter, cookie."""
        headers = request.headers.getall("Authorization", [])
        if headers:
            scheme, _, token = headers[0].partition(" ")
            if len(headers) != 1 or scheme.lower() != "bearer" or not token.strip():
                raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
            return token.strip()
        query = request.query.getall("authorization", [])
        if query:
            return query[0]
        cookie = request.cookies.get(self.cookie_name)
        if cookie is None:
            return None
        if publishing:
            self._check_origin(request)
        return cookie

    def _check_origin(self, request: web.Request) -> None:
        # A cookie rides along with any cross-site form post: only trusted origins may use it.
        origin = request.headers.get("Origin")
        if origin is None and (referer := request.headers.get("Referer")):
            with contextlib.suppress(ValueError):
                origin = str(URL(referer).origin())
        if origin is None:
            raise AuthError(403, "publishing with a cookie needs an Origin or Referer header")
        if "*" not in self.publish_origins and origin not in self.publish_origins:
            raise AuthError(403, f"origin {origin!r} may not publish with a cookie")

    def _claims(
        self, request: web.Request, verifier: Verifier, *, publishing: bool = False
    ) -> Claims | None:
        """The verified claims, ``None`` without a token; problem responses on failure."""
        try:
            token = self._token(request, publishing=publishing)
            return None if token is None else verifier.verify(token)
        except AuthError as exc:
            _fail(exc.status, str(exc), headers=CHALLENGE if exc.status == 401 else None)

    # --- subscribe ----------------------------------------------------------------

    async def subscribe(self, request: web.Request) -> web.StreamResponse:
        """``GET /.well-known/mercure?topic=...``: an event stream of matching updates."""
        self.check_request(request)
        raw = request.query.getall("topic", [])
        if not raw:
            _fail(400, 'Missing "topic" parameter.')
        if len(raw) > MAX_SELECTORS:
            _fail(400, f"at most {MAX_SELECTORS} topic selectors per subscription")
        try:
            selectors = Selectors(raw)
        except TemplateTooComplex as exc:
            _fail(400, str(exc))
        claims = self._claims(request, self.subscriber)
        if claims is None and not self.anonymous:
            _fail(401, "a token is required to subscribe", headers=CHALLENGE)
        try:
            await self.server.follow_events()  # other nodes' updates too, from now on
            after, resumed_from = await self._resume_point(request)
            # Registered before the headers go out: a client publishing on `onopen` is heard.
            subscription = self._subscribe(selectors, claims)
        except ServerBusy as exc:
            _fail(503, str(exc), headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        connection = Connection(f"urn:uuid:{uuid.uuid4()}", selectors, claims, subscription)
        headers = self.stream_headers(request)
        if resumed_from is not None:
            headers["Last-Event-ID"] = resumed_from
        return await self._stream(request, connection, after, headers)

    def _subscribe(self, selectors: Selectors, claims: Claims | None) -> Subscription[Event]:
        """The fan-out subscription; streams with the same selectors and rights share a group."""
        allowed = claims.subscribe if claims is not None else None
        key = ("mercure", selectors.raw, allowed.raw if allowed is not None else None)
        return self.server.fanout.subscribe(
            selectors.exact,
            match_all=selectors.match_all,
            match=selectors.match_template if selectors.templates else None,
            key=key,
            accept=functools.partial(self._allowed, selectors, allowed),
            encode=self._frame,
        )

    async def _resume_point(self, request: web.Request) -> tuple[int | None, str | None]:
        """Where replay starts (a sequence number; ``None``: live only) and the response's
        ``Last-Event-ID`` (``None`` when the request had none).

        A publisher's id is looked up first; otherwise digits are a task event's
        sequence number. An unknown id (never seen, or purged from the history)
        replays all stored history and answers ``earliest``: duplicates rather than
        a silent gap.
        """
        raw = request.headers.get("Last-Event-ID")
        if raw is None:
            raw = request.query.get("lastEventID")
        if not raw:
            return None, None
        if raw == EARLIEST:
            return 0, EARLIEST
        seq = await self.server.find_event(raw)
        if seq is not None:
            return seq, raw
        if _is_seq(raw) and int(raw) <= self.server.last_event_id:
            return int(raw), raw
        return 0, EARLIEST

    async def _stream(
        self,
        request: web.Request,
        connection: Connection,
        after: int | None,
        headers: dict[str, str] | None,
    ) -> EventSourceResponse:
        """Replay stored events with sequence numbers above ``after``, then live ones."""
        subscription = connection.subscription
        self.connections[connection.subscriber] = connection
        claims = connection.claims
        payload = claims.payload if claims is not None else None
        timer: asyncio.TimerHandle | None = None
        try:
            self.directory.add(connection.subscriber, list(connection.selectors.raw), payload)
            async with open_stream(
                request,
                subscription,
                heartbeat=self.server.settings.heartbeat,
                opening=b":\n\n",
                headers=headers,
                cache_control=CACHE_CONTROL,
            ) as response:
                expires = connection.claims.expires if connection.claims else None
                if expires is not None:
                    delay = max(0.0, expires - time.time())
                    timer = asyncio.get_running_loop().call_later(delay, connection.expire)
                last = 0
                if after is not None:
                    last = await self._replay(response, request.transport, connection, after)
                if not connection.expired:
                    subscription.stream(TransportSink(request), skip=lambda e: e.id <= last)
                    await subscription.closed_wait()
        finally:
            self.connections.pop(connection.subscriber, None)
            self.directory.remove(connection.subscriber)
            if timer is not None:
                timer.cancel()
        return response

    async def _replay(
        self,
        response: EventSourceResponse,
        writer: asyncio.Transport | None,
        connection: Connection,
        after: int,
    ) -> int:
        """Send stored matching events after ``after``; the last sequence number read.

        Live events at or below it were seen here, so the caller skips them; the
        subscription was made first, so nothing committed meanwhile is missed.
        """
        last = after
        while not connection.subscription.closed:
            page = await self.server.events_after(last, tasks_only=False, limit=REPLAY_PAGE)
            if connection.expired:
                return last
            frames = [self._frame(e) for e in page if self._wants(connection, e)]
            if page:
                last = page[-1].id
            if frames:
                await self._send(response, writer, b"".join(frames))
            if len(page) < REPLAY_PAGE:
                break
        return last

    def _topics(self, event: Event) -> tuple[str, ...]:
        if event.task_id is not None:
            return (self.server.topic(event.task_id),)
        return event.topics

    def _wants(self, connection: Connection, event: Event) -> bool:
        """Whether ``event`` goes to ``connection``: a topic matches, and rights if private."""
        claims = connection.claims
        allowed = claims.subscribe if claims is not None else None
        return self._allowed(connection.selectors, allowed, event)

    def _allowed(self, selectors: Selectors, allowed: Selectors | None, event: Event) -> bool:
        """Whether ``event`` goes to subscribers with these selectors and subscribe rights."""
        topics = self._topics(event)
        if not selectors.match_any(topics):
            return False
        if event.private or (
            event.task_id is not None and (self.private_tasks or self.tasks_private_by_api())
        ):
            return allowed is not None and allowed.match_any(topics)
        return True

    async def _send(
        self, response: EventSourceResponse, writer: asyncio.Transport | None, frame: bytes
    ) -> None:
        """Write frames; a client that stops reading is cut off after ``SEND_TIMEOUT``."""
        if writer is not None and writer.get_write_buffer_size() == 0:
            # An empty buffer means the write cannot wait: skip the timer (the hot path).
            await response.write(frame)
            return
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await response.write(frame)
        except TimeoutError:
            if writer is not None:
                writer.abort()
            raise

    def _frame(self, event: Event) -> bytes:
        """The event encoded as SSE, once for all the subscribers it goes to."""
        frame = self._frames.get(event.id)
        if frame is None:
            lines = [f"id: {event.sse_id}"]
            # Task events carry their type in the payload; unnamed, `onmessage` receives them.
            if event.task_id is None and event.type is not None:
                lines.append(f"event: {event.type}")
            lines += [f"data: {line}" for line in _LINE_BREAK.split(event.json)]
            if event.retry is not None:
                lines.append(f"retry: {event.retry}")
            frame = ("\n".join(lines) + "\n\n").encode()
            if len(self._frames) >= FRAME_CACHE:
                del self._frames[next(iter(self._frames))]  # the oldest
            self._frames[event.id] = frame
        return frame

    # --- publish -----------------------------------------------------------------------

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /.well-known/mercure`` (form): store the update, answer its id once durable."""
        self.check_request(request)
        claims = self._claims(request, self.publisher, publishing=True)
        if claims is None:
            _fail(401, "a publisher token is required", headers=CHALLENGE)
        if claims.publish is None or not claims.publish:
            _fail(403, "the token has no mercure.publish selectors")
        if request.content_type != FORM:
            _fail(415, f"the body must be {FORM}, got {request.content_type or 'none'}")
        form = await _read_form(request)

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) and value else None

        topics = tuple(v for v in form.getall("topic", []) if isinstance(v, str))
        if not topics:
            _fail(400, 'Missing "topic" parameter.')
        if len(topics) > MAX_TOPICS:
            _fail(400, f"at most {MAX_TOPICS} topics per update")
        if any(not t or len(t) > MAX_TOPIC_LENGTH for t in topics):
            _fail(400, f"topics must be 1 to {MAX_TOPIC_LENGTH} characters")
        uid = self._checked_id(field("id"))
        type_ = field("type")
        if type_ is not None and re.search(r"[\r\n\0]", type_):
            _fail(400, "type must not contain line breaks")
        retry_raw = field("retry")
        retry = None
        if retry_raw is not None:
            if not retry_raw.isascii() or not retry_raw.isdigit() or len(retry_raw) > 10:
                _fail(400, f"retry must be a non-negative integer, got {retry_raw!r}")
            retry = int(retry_raw)
        if not claims.publish.match_every(topics):
            _fail(403, "the token may not publish on every topic of this update")
        data = field("data") or ""
        uid = await self._store(topics, data, "private" in form, uid, type_, retry)
        self.published += 1
        return web.Response(
            text=uid, content_type="text/plain", headers={"Cache-Control": "private"}
        )

    @staticmethod
    def _checked_id(uid: str | None) -> str | None:
        if uid is None:
            return None
        if re.search(r"[\r\n\0]", uid):
            _fail(400, "id must not contain line breaks")
        if uid.startswith("#"):
            _fail(400, "id must not start with '#'")
        if _is_seq(uid) or uid == EARLIEST:
            # Digits are the ids of task events; `earliest` is the protocol's.
            _fail(400, f"id {uid!r} is reserved: use an IRI, e.g. urn:uuid:...")
        if len(uid) > MAX_ID_LENGTH:
            _fail(400, f"id must be at most {MAX_ID_LENGTH} characters")
        return uid

    async def _store(
        self,
        topics: tuple[str, ...],
        data: str,
        private: bool,
        uid: str | None,
        type_: str | None,
        retry: int | None,
    ) -> str:
        """Append the update to the store and wait for its commit; its id.

        A publisher's id the hub has seen is taken again, as the reference hub does:
        the id names the update for subscribers, it is not a key.
        """
        if uid is None:
            uid = f"urn:uuid:{uuid7()}"
        try:
            _, committed = self.server.publish_update(
                topics, data, private=private, uid=uid, type_=type_, retry=retry
            )
        except ServerBusy as exc:
            _fail(503, str(exc), headers={"Retry-After": str(max(1, round(exc.retry_after)))})
        await asyncio.shield(committed)
        return uid

    # --- subscriptions API ------------------------------------------------------------

    async def subscriptions(self, request: web.Request) -> web.Response:
        """``GET .../subscriptions[/{topic}]``: the active subscriptions (JSON-LD)."""
        self._authorize_api(request)
        docs = await self.directory.documents(request.match_info.get("topic"))
        body = {
            "@context": CONTEXT,
            "id": request.rel_url.raw_path,
            "type": "Subscriptions",
            "lastEventID": await self._last_event_id(),
            "subscriptions": docs,
        }
        return web.Response(text=json_text(body), content_type=JSON_LD)

    async def subscription(self, request: web.Request) -> web.Response:
        """``GET .../subscriptions/{topic}/{subscriber}``: one active subscription, or 404."""
        self._authorize_api(request)
        topic, subscriber = request.match_info["topic"], request.match_info["subscriber"]
        doc = await self.directory.document(topic, subscriber)
        if doc is None:
            _fail(404, "no such active subscription")
        body = {"@context": CONTEXT, **doc, "lastEventID": await self._last_event_id()}
        return web.Response(text=json_text(body), content_type=JSON_LD)

    def _authorize_api(self, request: web.Request) -> None:
        claims = self._claims(request, self.subscriber)
        if claims is None:
            _fail(401, "a subscriber token is required", headers=CHALLENGE)
        path = request.rel_url.raw_path
        urls = (path, f"{public_origin(request, self.server.settings.base_url)}{path}")
        if claims.subscribe is None or not claims.subscribe.match_any(urls):
            _fail(403, "the token's mercure.subscribe selectors do not match this URL")

    async def _last_event_id(self) -> str:
        """The SSE id of the newest committed event, or ``earliest``."""
        await self.server.follow_events()  # the cluster's newest, not what this node saw
        newest = self.server.last_event_id
        # The newest id handed out may not be committed yet: look a little further back.
        page = await self.server.events_after(max(0, newest - 100), tasks_only=False, limit=100)
        return page[-1].sse_id if page else EARLIEST

    # --- CORS and discovery -----------------------------------------------------------------

    async def preflight(self, request: web.Request) -> web.Response:
        """``OPTIONS`` on the hub: the CORS headers are added by ``decorate``."""
        # The methods of this path only: the subscriptions API takes no POST.
        methods = sorted({route.method for route in request.match_info.route.resource or ()})
        return web.Response(status=204, headers={"Allow": ", ".join(methods)})

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the discovery ``Link`` and the CORS headers to a response of the hub.

        Every hub route's response gets it, errors included (``problems.guard``);
        a stream is sent before that, so the hub's stream takes the same headers
        from ``stream_headers``.
        """
        response.headers.add("Link", discovery_link(request, self.server.settings.base_url))
        if self.cors_origins:
            response.headers.extend(self._cors(request))

    def stream_headers(self, request: web.Request) -> dict[str, str]:
        """What ``decorate`` would add, for the hub's event stream."""
        link = discovery_link(request, self.server.settings.base_url)
        return {"Link": link, **self._cors(request)}

    def _cors(self, request: web.Request) -> dict[str, str]:
        origin = request.headers.get("Origin")
        if origin is None or not self.cors_origins:
            return {}
        headers: dict[str, str]
        if origin in self.cors_origins:
            # Listed origins may send credentials (cookie, Authorization).
            headers = {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Vary": "Origin",
            }
        elif "*" in self.cors_origins:
            # Never reflected with credentials: "*" serves anonymous use only.
            headers = {"Access-Control-Allow-Origin": "*"}
        else:
            return {}
        headers["Access-Control-Expose-Headers"] = "Last-Event-ID, Link"
        if request.method == "OPTIONS":
            headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
            headers["Access-Control-Max-Age"] = CORS_MAX_AGE
        return headers


#: Where the hub lives on an application: ``app[MERCURE]``.
MERCURE: web.AppKey[MercureHub] = web.AppKey("mercure", MercureHub)


def add_routes(app: web.Application, server: HubServer) -> MercureHub:
    """Mount the hub on ``app`` at ``/.well-known/mercure`` and add the response headers.

    Raises ``ConfigError`` (before anything is served) for an unusable key or origin.
    """
    hub = MercureHub(server)
    app[MERCURE] = hub
    routes: list[tuple[str, str, Handler]] = [
        ("GET", HUB_PATH, hub.subscribe),
        ("POST", HUB_PATH, hub.publish),
        ("OPTIONS", HUB_PATH, hub.preflight),
    ]
    if server.settings.mercure_subscriptions:
        for path in (SUBSCRIPTIONS_PATH, SUBSCRIPTIONS_PATH + "/{topic}"):
            routes += [("GET", path, hub.subscriptions), ("OPTIONS", path, hub.preflight)]
        path = SUBSCRIPTIONS_PATH + "/{topic}/{subscriber}"
        routes += [("GET", path, hub.subscription), ("OPTIONS", path, hub.preflight)]
    for method, path, handler in routes:
        app.router.add_route(method, path, guard(handler, hub.decorate))
    return hub
