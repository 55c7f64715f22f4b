"""Who is subscribed to what, for the Mercure subscriptions API.

On one server the hub's own streams are all there is. On a cluster every node also
records its subscribers where the others read them (``SharedDirectory``, the
PostgreSQL backend's ``SharedSubscribers``): a node lists its own from memory and
the other live nodes' from the database, so any node answers for the whole hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import quote

import orjson

#: ``(subscriber IRI, topic selectors, JWT payload as JSON or None)``, as stored.
Row = tuple[str, list[str], str | None]
#: Subscriptions of other nodes listed at most per request.
MAX_LISTED = 10_000


class SharedDirectory(Protocol):
    """This node's subscribers where the cluster reads them, and the others' from there."""

    def joined(self, subscriber: str, topics: list[str], payload: str | None) -> None: ...

    def left(self, subscriber: str) -> None: ...

    async def listed(self, topic: str | None, limit: int) -> list[Row]: ...

    async def find(self, subscriber: str) -> Row | None: ...


class Directory:
    """The active subscriptions: this hub's streams and, on a cluster, every node's.

    ``shared`` gives the cluster's directory once the server runs (``None`` on one
    server, or before it started).
    """

    def __init__(self, subscriptions_path: str, shared: Callable[[], SharedDirectory | None]):
        self._path = subscriptions_path
        self._shared = shared
        #: subscriber -> (topics, JWT payload): this hub's active streams
        self._local: dict[str, tuple[list[str], Any]] = {}

    def add(self, subscriber: str, topics: list[str], payload: Any) -> None:
        """A stream of this hub is active."""
        self._local[subscriber] = (topics, payload)
        shared = self._shared()
        if shared is not None:
            shared.joined(subscriber, topics, None if payload is None else json_text(payload))

    def remove(self, subscriber: str) -> None:
        """That stream ended (or ``add`` failed)."""
        if self._local.pop(subscriber, None) is None:
            return
        shared = self._shared()
        if shared is not None:
            shared.left(subscriber)

    async def documents(self, topic: str | None) -> list[dict[str, Any]]:
        """One ``Subscription`` document per subscriber and selector (only ``topic``'s,
        when given): this hub's first, then the other nodes'."""
        docs = [
            self._document(subscriber, selector, payload)
            for subscriber, (topics, payload) in list(self._local.items())
            for selector in topics
            if topic is None or selector == topic
        ]
        shared = self._shared()
        if shared is not None:
            for subscriber, topics, payload in await shared.listed(topic, MAX_LISTED):
                loaded = None if payload is None else json.loads(payload)
                docs += [
                    self._document(subscriber, selector, loaded)
                    for selector in topics
                    if topic is None or selector == topic
                ]
        return docs

    async def document(self, topic: str, subscriber: str) -> dict[str, Any] | None:
        """The ``Subscription`` of ``subscriber`` to ``topic``, on any node, or ``None``."""
        local = self._local.get(subscriber)
        if local is not None:
            topics, payload = local
        else:
            shared = self._shared()
            row = None if shared is None else await shared.find(subscriber)
            if row is None:
                return None
            topics, payload = row[1], None if row[2] is None else json.loads(row[2])
        return self._document(subscriber, topic, payload) if topic in topics else None

    def _document(self, subscriber: str, selector: str, payload: Any) -> dict[str, Any]:
        topic_part, subscriber_part = quote(selector, safe=""), quote(subscriber, safe="")
        doc: dict[str, Any] = {
            "id": f"{self._path}/{topic_part}/{subscriber_part}",
            "type": "Subscription",
            "subscriber": subscriber,
            "topic": selector,
            "active": True,
        }
        if payload is not None:
            doc["payload"] = payload
        return doc


def json_text(value: Any) -> str:
    """``value`` as JSON: a JWT's payload may hold what orjson refuses."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # e.g. an integer past 64 bits, which a JWT's JSON may hold
        return json.dumps(value)
