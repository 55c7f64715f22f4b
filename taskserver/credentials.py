"""API credentials as the settings hold them: scope names and named tokens.

A named token keeps only the SHA-256 of its secret; ``access.py`` compares
digests in constant time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: What an API credential may allow (taskserver/access.py); ``admin`` implies the others.
#: ``metrics`` reads ``/metrics`` only: what a Prometheus scraper is given.
API_SCOPES = ("read", "enqueue", "metrics", "admin")
#: Shorter API secrets are refused: a token is a password that never needs typing.
MIN_TOKEN_CHARS = 16
_TOKEN_HINT = "e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class ApiToken:
    """A named API token from the config file: the SHA-256 of its secret and its scopes."""

    name: str
    sha256: bytes
    scopes: frozenset[str]

    def __repr__(self) -> str:  # never the digest: logs and tracebacks show settings
        return f"<ApiToken {self.name} scopes={','.join(sorted(self.scopes))}>"

    @classmethod
    def create(cls, name: str, token: str, scopes: list[str]) -> ApiToken:
        """An ``ApiToken`` from its secret, checked as the config file's are."""
        return parse_api_tokens({name: {"token": token, "scopes": scopes}}, "code")[0]


def check_api_token(value: Any) -> str | None:
    """What is wrong with ``api_token``'s value, or ``None``."""
    if value and len(value) < MIN_TOKEN_CHARS:
        return f"must be at least {MIN_TOKEN_CHARS} characters ({_TOKEN_HINT})"
    return None


def _scopes(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise ConfigError(f"{where}.scopes must be a non-empty list of {', '.join(API_SCOPES)}")
    unknown = sorted(set(value) - set(API_SCOPES))
    if unknown:
        raise ConfigError(
            f"{where}.scopes: unknown scope {unknown[0]!r}; allowed: {', '.join(API_SCOPES)}"
        )
    return frozenset(value)


def parse_api_tokens(value: Any, source: str) -> tuple[ApiToken, ...]:
    """``[api_tokens.NAME]`` tables (``token`` or ``sha256``, and ``scopes``) as ``ApiToken``s.

    Raises ``ConfigError`` naming the table and key at fault.
    """
    if not isinstance(value, dict):
        raise ConfigError(
            f"api_tokens must be a table of tables like [api_tokens.ci] (from {source})"
        )
    tokens = []
    seen: dict[bytes, str] = {}
    for name, entry in value.items():
        where = f"api_tokens.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table with token and scopes (from {source})")
        unknown = sorted(set(entry) - {"token", "sha256", "scopes"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r}; allowed: token, sha256, scopes"
            )
        if ("token" in entry) == ("sha256" in entry):
            raise ConfigError(f"{where}: give exactly one of token or sha256 (from {source})")
        if "token" in entry:
            secret = entry["token"]
            if not isinstance(secret, str) or len(secret) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"{where}.token must be a string of at least {MIN_TOKEN_CHARS} characters "
                    f"({_TOKEN_HINT})"
                )
            digest = hashlib.sha256(secret.encode()).digest()
        else:
            hexdigest = entry["sha256"]
            if not isinstance(hexdigest, str) or not _SHA256_HEX.fullmatch(hexdigest):
                raise ConfigError(
                    f"{where}.sha256 must be 64 lowercase hex digits "
                    '(printf %s "$TOKEN" | sha256sum)'
                )
            digest = bytes.fromhex(hexdigest)
        if digest in seen:
            raise ConfigError(f"{where}: same token as api_tokens.{seen[digest]}")
        seen[digest] = name
        tokens.append(ApiToken(name, digest, _scopes(entry.get("scopes"), where)))
    return tuple(tokens)
