"""Mercure authorization: verify a JWS and read its ``mercure`` claim.

PyJWT does the cryptography (a maintained JWS implementation rather than our
own). The contract:

* the token's header ``alg`` must be the configured one, so ``alg: none`` and
  algorithm-confusion tricks (an HMAC token signed with an RSA public key) are
  refused;
* ``exp`` and ``nbf`` are checked when present (no leeway); ``aud`` is not, as
  the reference hub does not either;
* the claim is ``mercure`` or, namespaced, ``https://mercure.rocks/``; its
  ``publish`` and ``subscribe`` keys are arrays of topic selectors (anything
  else is a 401: a malformed token is an invalid token) and ``payload`` any JSON.

Keys: HS256 takes the shared secret as text, at least 32 bytes. RS256 takes the *public* key in
PEM, given either as the PEM text itself (it starts with ``-----BEGIN``) or as
the path of a PEM file, read once at startup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..errors import ConfigError
from .topics import Selectors

#: Algorithms a hub can be configured with.
ALGORITHMS = ("HS256", "RS256")
#: Where the Mercure claims may live in a token.
CLAIM_NAMES = ("mercure", "https://mercure.rocks/")
#: Shorter keys are refused at startup: PyJWT would warn on every verification, and
#: rightly (RFC 7518 §3.2 asks for a key at least as long as the hash).
MIN_HMAC_BYTES = 32
MIN_RSA_BITS = 2048
#: Registered time claims: PyJWT accepts a numeric string for them, the spec does not.
TIME_CLAIMS = ("exp", "nbf", "iat")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class AuthError(Exception):
    """The token is missing, invalid or not allowed. ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token allows. Selectors are ``None`` when the claim is absent."""

    publish: Selectors | None
    subscribe: Selectors | None
    payload: Any
    #: When the token stops being accepted, seconds since the epoch, or ``None``: the
    #: ``exp`` claim's whole seconds, since PyJWT compares ``int(exp)`` with the clock
    #: and a stream must not outlive a token a new request would be refused with.
    expires: float | None


def load_key(value: str, alg: str, setting: str) -> str | RSAPublicKey:
    """The verification key for ``alg`` from a setting's text; ``ConfigError`` if unusable.

    For RS256, ``value`` is PEM text or a path to a PEM file holding the public key.
    """
    alg_setting = "api_jwt_alg" if setting.startswith("api_") else "mercure_jwt_alg"
    if alg not in ALGORITHMS:
        raise ConfigError(f"{alg_setting} must be one of {', '.join(ALGORITHMS)}, got {alg!r}")
    if alg == "HS256":
        if value.lstrip().startswith("-----BEGIN"):
            # PyJWT refuses a PEM key as an HMAC secret only when a token comes: say it now.
            raise ConfigError(
                f"{setting}: this is a PEM key, not an HS256 secret; "
                f"for a public key set {alg_setting} = RS256"
            )
        if len(value.encode()) < MIN_HMAC_BYTES:
            raise ConfigError(
                f"{setting}: an HS256 key needs at least {MIN_HMAC_BYTES} bytes (RFC 7518 §3.2), "
                f"e.g. the dev key '!ChangeThisMercureHubJWTSecretKey!'"
            )
        return value
    pem = value
    if not value.lstrip().startswith("-----BEGIN"):
        try:
            pem = Path(value).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            # Never the value: it may be a secret put in the wrong setting.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not ASCII"
            raise ConfigError(
                f"{setting}: neither PEM text (-----BEGIN ...) nor a readable PEM file "
                f"({len(value)} characters, {reason})"
            ) from None
    try:
        key = load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as exc:
        raise ConfigError(f"{setting}: not a PEM public key ({type(exc).__name__})") from None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(f"{setting}: RS256 needs an RSA public key")
    if key.key_size < MIN_RSA_BITS:
        raise ConfigError(f"{setting}: an RSA key needs at least {MIN_RSA_BITS} bits")
    return key


class Verifier:
    """Verifies tokens with one key and algorithm. An empty key refuses every token."""

    def __init__(self, key: str | RSAPublicKey, alg: str) -> None:
        self._key = key
        self._alg = alg

    def __repr__(self) -> str:
        return f"<Verifier {self._alg}{'' if self._key else ' no key'}>"

    def verify(self, token: str) -> Claims:
        """The claims of a valid ``token``; ``AuthError(401)`` otherwise."""
        return _claims(self.decode(token))

    def decode(self, token: str) -> dict[str, Any]:
        """Every claim of a valid ``token``; ``AuthError(401)`` otherwise."""
        if not self._key:
            raise AuthError(401, "no key is configured to verify this token")
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") != self._alg:
                raise AuthError(401, f"the token's algorithm must be {self._alg}")
            if "crit" in header:
                # RFC 7515 §4.1.11: an extension the recipient does not know must be
                # refused, and we know none (older PyJWT accepted any).
                raise AuthError(401, "the token's header names critical extensions")
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[self._alg],
                options={"verify_aud": False, "require": []},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "the token has expired") from None
        except jwt.PyJWTError as exc:  # InvalidKeyError too: never a 500
            raise AuthError(401, f"invalid token: {clean(str(exc))}") from None
        except UnicodeError:  # header bytes that are not UTF-8
            raise AuthError(401, "invalid token: not ASCII") from None
        if not isinstance(payload, dict):  # pragma: no cover - PyJWT returns a dict
            raise AuthError(401, "invalid token: the payload must be an object")
        for name in TIME_CLAIMS:
            value = payload.get(name)
            if name in payload and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise AuthError(401, f"invalid token: {name} must be a number (RFC 7519 §4.1)")
        return payload


def clean(text: str, limit: int = 200) -> str:
    """``text`` without control characters, at most ``limit`` long: safe to log and to show."""
    return _CONTROL.sub("?", text)[:limit]


def _claims(payload: dict[str, Any]) -> Claims:
    """The ``mercure`` claim of a payload ``decode`` returned; ``AuthError(401)`` if malformed."""
    claim: Any = None
    for name in CLAIM_NAMES:
        if name in payload:
            claim = payload[name]
            break
    if claim is None:
        claim = {}
    if not isinstance(claim, dict):
        raise AuthError(401, "invalid token: the mercure claim must be an object")
    exp = payload.get("exp")
    return Claims(
        publish=_selectors(claim, "publish"),
        subscribe=_selectors(claim, "subscribe"),
        payload=claim.get("payload"),
        expires=float(int(exp)) if isinstance(exp, int | float) else None,
    )


mercure_claims = _claims


def _selectors(claim: dict[str, Any], key: str) -> Selectors | None:
    value = claim.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise AuthError(401, f"invalid token: mercure.{key} must be an array of strings")
    # Signed by the operator's key: trusted, so any template is compiled as written.
    return Selectors(value, trusted=True)
