"""HTTPS without a proxy: the server's ``ssl.SSLContext`` from two PEM files.

TLS 1.2 at least, Python's default ciphers for a server; the key must not be
encrypted (nothing could type its password when a service starts).
"""

from __future__ import annotations

import ssl

from ..errors import ConfigError


def server_context(cert: str, key: str) -> ssl.SSLContext | None:
    """The context serving ``cert`` (the chain, PEM) with ``key``; ``None`` when both are empty.

    Raises ``ConfigError`` naming the setting when a file is missing or unusable.
    """
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "tls_key" if cert else "tls_cert"
        raise ConfigError(f"{missing} is not set: TLS needs both tls_cert and tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        # A password callback that gives none: an encrypted key fails instead of prompting.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert {cert} and tls_key {key} are not a PEM certificate and its unencrypted "
            f"private key: {exc.reason or exc}"
        ) from None
    return context
