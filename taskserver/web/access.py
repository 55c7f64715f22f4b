"""Who may use the HTTP API: bearer tokens with scopes, JWTs, the dashboard's cookie, or
the host application's own authorizer.

Every route of ``api.ROUTES`` names what it needs (a ``Need``: a scope, and whether a
Mercure subscriber allowed the task's topic will do); ``Access.protect`` wraps its
handler so that the check happens in one place. The contract:

* Scopes: ``read`` (GET tasks, stats, event streams), ``enqueue`` (POST /tasks,
  /tasks:batch), ``metrics`` (GET /metrics), ``admin`` (everything else); ``admin``
  implies the others.
* Credentials, tried in order: ``Authorization: Bearer <token>``, else the dashboard's
  ``taskserver_token`` cookie. A token is one of the configured secrets (``api_token``
  has every scope, ``[api_tokens.NAME]`` their own), compared as SHA-256 digests in
  constant time; or a JWT verified with ``api_jwt_key`` whose ``taskserver.scopes``
  claim lists its scopes; or a Mercure subscriber JWT, which reads only the tasks whose
  topic its ``mercure.subscribe`` selectors match (also from the Mercure cookie).
* With an authorizer (``server.authorize(fn)``) a request that brings no valid token
  of ours is given to ``fn(request, scope)``: true allows, false is a 403, and what it
  raises propagates (``AccessDenied`` chooses the status and message).
* Enforced as soon as any token, JWT key or authorizer is configured. Without any, the
  API is open (loopback only, see ``check_exposure``), except that with
  ``mercure_private_tasks`` reads and admin answers need a credential; and an open
  loopback server answers only a ``Host`` naming loopback or ``base_url`` (421
  otherwise: DNS rebinding, ``exposure.py``), on the hub too. With any credential the
  hub's task events are private (``MercureHub.tasks_private_by_api``).
* A token that is not UTF-8, a JWT with malformed claims or one the key cannot
  verify is a 401, never a 500; ``WWW-Authenticate`` carries fixed text only.
* Missing or invalid credentials: 401 with ``WWW-Authenticate: Bearer``; a valid one
  without the scope: 403. Writes carrying the cookie must come with this server's
  ``Origin`` (CSRF); other writes that carry an ``Origin`` must carry ours too.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from ..credentials import API_SCOPES
from ..errors import AccessDenied, ConfigError, ValidationError
from ..push.jws import AuthError, Verifier, clean, load_key, mercure_claims
from ..push.mercure import MercureHub
from ..push.origins import local_origin
from ..push.topics import Selectors
from ..server import TaskServer
from .exposure import check_host, is_loopback

log = logging.getLogger(__name__)

REALM = "taskserver"
#: The dashboard's session cookie: the token itself, HttpOnly and SameSite=Strict.
COOKIE = "taskserver_token"
#: The JWT claim holding an API token's scopes: ``{"taskserver": {"scopes": [...]}}``.
CLAIM = "taskserver"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ALL_SCOPES = frozenset(API_SCOPES)
#: The only ``error_description`` sent: a header never carries text from the token.
INVALID = "the token is not valid"

#: ``fn(request, scope) -> bool`` (or awaitable): the host application's decision.
Authorizer = Callable[[web.Request, str], bool | Awaitable[bool]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Need:
    """What a route needs: ``scope``; with ``by_topic`` a token allowed the task's topic will do."""

    scope: str
    by_topic: bool = False


READ = Need("read")
READ_TASK = Need("read", by_topic=True)
ENQUEUE = Need("enqueue")
METRICS = Need("metrics")
ADMIN = Need("admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: a name for logs, its scopes, and Mercure subscribe selectors."""

    name: str
    scopes: frozenset[str]
    topics: Selectors | None = None

    def allows(self, scope: str) -> bool:
        """Whether the scopes include ``scope`` (``admin`` includes every scope)."""
        return scope in self.scopes or "admin" in self.scopes


OPEN = Principal("anonymous (no credentials configured)", ALL_SCOPES)
AUTHORIZED = Principal("the application's authorizer", ALL_SCOPES)


def _challenge(error: str | None = None, scope: str = "") -> str:
    """A ``WWW-Authenticate`` value (RFC 6750 §3), from fixed text only."""
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{error}"')
    if error == "invalid_token":
        parts.append(f'error_description="{INVALID}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return "Bearer " + ", ".join(parts)


def _unauthorized(message: str, *, invalid: bool = False) -> AccessDenied:
    """A 401; ``message`` (which may quote the token) goes to the problem body only."""
    challenge = _challenge("invalid_token") if invalid else _challenge()
    return AccessDenied(clean(message), status=401, challenge=challenge)


class Access:
    """The API's credentials and the checks made with them. Raises ``ConfigError`` early."""

    def __init__(self, server: TaskServer, prefix: str = "", hub: MercureHub | None = None) -> None:
        settings = server.settings
        self.server = server
        #: Its subscriber key verifies Mercure tokens; ``None``: they are not accepted.
        self.hub = hub
        self._tokens: list[tuple[bytes, Principal]] = []
        if settings.api_token:
            digest = hashlib.sha256(settings.api_token.encode()).digest()
            self._tokens.append((digest, Principal("api_token", ALL_SCOPES)))
        for token in settings.api_tokens:
            if self._tokens and hmac.compare_digest(self._tokens[0][0], token.sha256):
                raise ConfigError(f"api_tokens.{token.name}: same token as api_token")
            self._tokens.append((token.sha256, Principal(f"api_tokens.{token.name}", token.scopes)))
        self._jwt: Verifier | None = None
        if settings.api_jwt_key:
            key = load_key(settings.api_jwt_key, settings.api_jwt_alg, "api_jwt_key")
            self._jwt = Verifier(key, settings.api_jwt_alg)
        self.private = settings.mercure_private_tasks
        self.base_url = settings.base_url
        self._base_origin = str(URL(settings.base_url).origin()) if settings.base_url else ""
        self._base_host = (URL(settings.base_url).host or "").lower() if settings.base_url else ""
        self.cookie_path = prefix or "/"
        if hub is not None:
            # The hub's task events are as private as the API's task data.
            hub.tasks_private_by_api = lambda: self.enforced
            hub.check_request = self.check_host

    def __repr__(self) -> str:
        mode = "enforced" if self.enforced else "open"
        return f"<Access {mode} tokens={len(self._tokens)} jwt={self._jwt is not None}>"

    @property
    def enforced(self) -> bool:
        """Whether every protected route needs a credential (a token, a JWT key, an authorizer)."""
        return bool(self._tokens) or self._jwt is not None or self.server.authorizer is not None

    # --- identifying a token -------------------------------------------------------------

    def identify(self, token: str) -> Principal:
        """Who ``token`` is; ``AccessDenied(401)`` when it is none of ours."""
        try:
            digest = hashlib.sha256(token.encode()).digest()
        except UnicodeError:  # header or cookie bytes that are not UTF-8
            raise _unauthorized("the token is not valid UTF-8", invalid=True) from None
        found: Principal | None = None
        for known, principal in self._tokens:  # every one, whatever matches: constant time
            if hmac.compare_digest(known, digest):
                found = principal
        if found is not None:
            return found
        reasons = []
        if token.count(".") == 2:
            for verify in (self._from_api_jwt, self._from_mercure_jwt):
                try:
                    verified = verify(token)
                except AuthError as exc:
                    reasons.append(str(exc))
                    continue
                if verified is not None:
                    return verified
        raise _unauthorized(reasons[0] if reasons else "the token is not valid", invalid=True)

    def _from_api_jwt(self, token: str) -> Principal | None:
        if self._jwt is None:
            return None
        payload = self._jwt.decode(token)
        claim = payload.get(CLAIM, {})
        scopes = claim.get("scopes", []) if isinstance(claim, dict) else None
        if not isinstance(scopes, list) or not all(
            isinstance(s, str) and s in ALL_SCOPES for s in scopes
        ):
            raise AuthError(401, f"{CLAIM}.scopes must be a list of {', '.join(API_SCOPES)}")
        topics = mercure_claims(payload).subscribe
        subject = payload.get("sub")
        return Principal(f"jwt {subject}" if subject else "jwt", frozenset(scopes), topics)

    def _from_mercure_jwt(self, token: str) -> Principal | None:
        if self.hub is None:
            return None
        claims = self.hub.subscriber.verify(token)
        return Principal("mercure subscriber", frozenset(), claims.subscribe)

    # --- the check ---------------------------------------------------------------------------

    def protect(self, handler: Handler, need: Need | None) -> Handler:
        """``handler``, run only for requests allowed ``need`` (``None``: open to all)."""
        if need is None:
            return handler

        async def protected(request: web.Request) -> web.StreamResponse:
            if not self._open_passes(request):  # the open case without a coroutine for it
                await self._check(request, need)
            return await handler(request)

        protected.__name__ = getattr(handler, "__name__", "handler")
        protected.__doc__ = handler.__doc__
        return protected

    def admission(self, need: Need | None) -> Callable[[web.Request], Awaitable[Any] | None] | None:
        """``protect``'s check alone, for ``problems.guard(admit=)`` (``None`` for a route
        open to all): it answers ``None`` when the request passes at once (nothing is
        configured), else the check to await; it raises when the request is refused."""
        if need is None:
            return None

        def admit(request: web.Request) -> Awaitable[Any] | None:
            return None if self._open_passes(request) else self._check(request, need)

        return admit

    async def check(self, request: web.Request, need: Need) -> Principal:
        """Who may do what ``need`` says, or ``AccessDenied`` (401 or 403)."""
        if self._open_passes(request):
            return OPEN
        return await self._check(request, need)

    def _open_passes(self, request: web.Request) -> bool:
        """True when nothing is configured (open, loopback) and ``request`` passes the
        Host and Origin checks; ``AccessDenied`` when it fails them; False when a
        credential or an authorizer is configured (``_check`` decides)."""
        if self._tokens or self._jwt or self.private or self.server.authorizer:
            return False
        # Open, the hot path: only rebinding Hosts and other sites' writes are refused.
        check_host(request, self._base_host)
        if "Origin" in request.headers and request.method not in SAFE_METHODS:
            self._same_origin(request, required=False)
        return True

    async def _check(self, request: web.Request, need: Need) -> Principal:
        """``check`` when a credential or an authorizer is configured."""
        unsafe = request.method not in SAFE_METHODS
        token, via_cookie = self._credential(request)
        error: AccessDenied | None = None
        if token is not None:
            try:
                principal = self.identify(token)
            except AccessDenied as exc:
                error = exc
            else:
                if via_cookie and unsafe:
                    self._same_origin(request, required=True)
                return self._allowed(request, principal, need)
        authorizer = self.server.authorizer
        if authorizer is not None:
            if unsafe:
                self._same_origin(request, required=False)
            decision = authorizer(request, need.scope)
            if inspect.isawaitable(decision):
                decision = await decision
            if not decision:
                raise AccessDenied(f"the application does not allow {need.scope} here")
            return AUTHORIZED
        if error is not None:
            raise error
        if need.by_topic and self.hub is not None:
            mercure_cookie = request.cookies.get(self.hub.cookie_name)
            if mercure_cookie:
                return self._allowed(request, self.identify(mercure_cookie), need)
        if self.enforced:
            raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        check_host(request, self._base_host)
        if unsafe:
            self._same_origin(request, required=False)
        if self.private and need.scope != "enqueue":
            raise _unauthorized("task data is private (mercure_private_tasks): send a token")
        return OPEN

    def _credential(self, request: web.Request) -> tuple[str | None, bool]:
        """The bearer token and whether it came from the cookie."""
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token:
                return token, False
            if self.server.authorizer is None:
                raise _unauthorized("the Authorization header must be 'Bearer <token>'")
            return None, False  # the application's own scheme (Basic, ...): its authorizer's
        if COOKIE not in request.headers.get("Cookie", ""):
            return None, False  # skips parsing the cookies of most requests
        cookie = request.cookies.get(COOKIE)
        return (cookie, True) if cookie else (None, False)

    def _allowed(self, request: web.Request, principal: Principal, need: Need) -> Principal:
        if principal.allows(need.scope):
            return principal
        if need.by_topic and principal.topics is not None:
            raw = request.match_info.get("id", "")
            valid = raw.isascii() and raw.isdigit() and len(raw) <= 18
            if valid and principal.topics.match_any((self.server.topic(int(raw)),)):
                return principal
        raise AccessDenied(
            f"{principal.name} lacks the {need.scope} scope",
            status=403,
            challenge=_challenge("insufficient_scope", scope=need.scope),
        )

    def check_host(self, request: web.Request) -> None:
        """While no credential is configured: ``AccessDenied(421)`` for a non-loopback ``Host``."""
        if not self.enforced:
            check_host(request, self._base_host)

    # --- CSRF ------------------------------------------------------------------------------

    def own_origin(self, request: web.Request) -> str:
        """This server's origin: ``base_url``'s, else the listening socket's."""
        return self._base_origin or local_origin(request)

    def _same_origin(self, request: web.Request, *, required: bool) -> None:
        """Refuse a write whose ``Origin`` is another site's (or, if ``required``, absent)."""
        origin = request.headers.get("Origin")
        if origin is None:
            if required:
                raise AccessDenied("a write made with the session cookie needs an Origin header")
            return
        own = self.own_origin(request)
        if origin == own or (not self._base_origin and origin == _localhost_alias(own)):
            return
        raise AccessDenied(
            f"Origin {origin} is not this server's ({own}); set base_url to the URL browsers use"
        )

    # --- the dashboard's session routes ----------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        """``POST /session {"token"}`` (JSON or form): check it, keep it in the cookie."""
        self._same_origin(request, required=True)
        if request.content_type == "application/json":
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                body = None
            token = body.get("token") if isinstance(body, dict) else None
        else:
            try:
                form = await request.post()
            except ValueError:  # UnicodeDecodeError included
                raise ValidationError("the form body is not valid", field="token") from None
            token = form.get("token")
        if not isinstance(token, str) or not token.strip():
            raise ValidationError("token is required", field="token")
        principal = self.identify(token.strip())
        if not principal.scopes:
            raise AccessDenied("this token has no API scope (read, enqueue, metrics or admin)")
        response = _json({"name": principal.name, "scopes": sorted(principal.scopes)})
        response.set_cookie(
            COOKIE,
            token.strip(),
            path=self.cookie_path,
            httponly=True,
            samesite="Strict",
            secure=request.secure or self.base_url.startswith("https:"),
        )
        log.info("dashboard login as %s from %s", principal.name, request.remote)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        """``DELETE /session``: forget the cookie."""
        response = web.Response(status=204)
        response.del_cookie(COOKIE, path=self.cookie_path, samesite="Strict")
        return response

    async def session(self, request: web.Request) -> web.Response:
        """``GET /session`` → whether a credential is required and who this request is."""
        required = self.enforced or self.private
        try:
            principal = await self.check(request, READ)
        except AccessDenied:
            return _json({"required": required, "authenticated": False, "scopes": []})
        return _json(
            {
                "required": required,
                "authenticated": principal is not OPEN,
                "name": principal.name,
                "scopes": sorted(principal.scopes),
            }
        )


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _localhost_alias(origin: str) -> str:
    """``http://localhost:8080`` for ``http://127.0.0.1:8080``: one machine, two spellings."""
    url = URL(origin)
    if url.host is not None and is_loopback(url.host) and url.host != "localhost":
        return str(url.with_host("localhost").origin())
    return ""
