"""``Fanout``: fan-out of published items to subscribers, by topic.

Each subscriber owns one bounded buffer. Publishing never waits: an item is
appended to the buffer of every matching subscriber, and a subscriber whose
buffer is full is *dropped* (closed, with ``overflowed`` set) instead of slowing
the publisher or anyone else. A dropped client reconnects with ``Last-Event-ID``
and replays what it missed from the store. The number of subscribers is bounded
too; past it ``subscribe`` raises ``ServerBusy``.

Matching: a subscriber names exact topics (found through a dict, so publishing
costs nothing per non-matching subscriber), asks for everything, or brings a
predicate (URI templates) that is tried on each topic.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from ..errors import ServerBusy

T = TypeVar("T")


class Subscription(Generic[T]):
    """One subscriber's buffer. Iterate with ``await sub.get()`` until it returns ``None``."""

    __slots__ = (
        "_hub",
        "_items",
        "_limit",
        "_waiter",
        "closed",
        "exact",
        "match",
        "match_all",
        "overflowed",
    )

    def __init__(
        self,
        hub: Fanout[T],
        limit: int,
        exact: frozenset[str],
        match_all: bool,
        match: Callable[[str], bool] | None,
    ) -> None:
        self._hub = hub
        self._items: deque[T] = deque()
        self._limit = limit
        self._waiter: asyncio.Future[None] | None = None
        self.exact = exact
        self.match_all = match_all
        self.match = match
        self.closed = False
        #: Set when the hub dropped this subscriber because its buffer was full.
        self.overflowed = False

    def __repr__(self) -> str:
        state = " overflowed" if self.overflowed else (" closed" if self.closed else "")
        return f"<Subscription buffered={len(self._items)}/{self._limit}{state}>"

    def put(self, item: T) -> None:
        """Buffer ``item``; a full buffer closes the subscription instead."""
        if self.closed:
            return
        if len(self._items) >= self._limit:
            self.overflowed = True
            self.close()
            return
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> T | None:
        """The next item, waiting for one; ``None`` once closed and drained... or overflowed.

        After an overflow the remaining buffer is discarded: the client must
        replay from the store, and would otherwise see a gap.
        """
        while not self._items:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.overflowed:
            return None
        return self._items.popleft()

    def get_nowait(self) -> T | None:
        """The next buffered item, or ``None``."""
        if self.overflowed or not self._items:
            return None
        return self._items.popleft()

    def close(self) -> None:
        """Stop receiving; ``get`` returns what is buffered, then ``None``. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.overflowed:
            self._items.clear()
        self._hub._forget(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Fanout(Generic[T]):
    """Routes published items to subscriptions. All methods are sync and never block."""

    def __init__(self, *, max_subscribers: int, buffer_size: int) -> None:
        self.max_subscribers = max_subscribers
        self.buffer_size = buffer_size
        self._count = 0
        self._all: set[Subscription[T]] = set()
        self._exact: dict[str, set[Subscription[T]]] = {}
        self._predicates: set[Subscription[T]] = set()
        self.published = 0
        self.dropped = 0

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"<Fanout subscribers={self._count}/{self.max_subscribers} "
            f"published={self.published} dropped={self.dropped}>"
        )

    def subscribe(
        self,
        topics: Iterable[str] = (),
        *,
        match_all: bool = False,
        match: Callable[[str], bool] | None = None,
    ) -> Subscription[T]:
        """Register a subscriber for ``topics`` (exact), everything, or a predicate.

        Raises ``ServerBusy`` when ``max_subscribers`` are connected. The caller
        must ``close()`` the subscription when done (in a ``finally``).
        """
        if self._count >= self.max_subscribers:
            raise ServerBusy("too many open event streams", retry_after=5.0)
        sub = Subscription(self, self.buffer_size, frozenset(topics), match_all, match)
        self._count += 1
        if match_all:
            self._all.add(sub)
        if match is not None:
            self._predicates.add(sub)
        for topic in sub.exact:
            self._exact.setdefault(topic, set()).add(sub)
        return sub

    def _forget(self, sub: Subscription[T]) -> None:
        self._count -= 1
        if sub.overflowed:
            self.dropped += 1
        self._all.discard(sub)
        self._predicates.discard(sub)
        for topic in sub.exact:
            subs = self._exact.get(topic)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._exact[topic]

    def publish(self, topics: tuple[str, ...], item: T) -> None:
        """Hand ``item`` to every subscriber matching any of ``topics``, once each."""
        self.published += 1
        if not self._count:
            return
        targets: set[Subscription[T]] = set(self._all)
        for topic in topics:
            exact = self._exact.get(topic)
            if exact:
                targets |= exact
            for sub in self._predicates:
                if sub not in targets and sub.match is not None and sub.match(topic):
                    targets.add(sub)
        for sub in targets:
            sub.put(item)

    def close(self) -> None:
        """Close every subscription (server shutdown): streams end, clients reconnect."""
        subs = set(self._all) | self._predicates
        for group in self._exact.values():
            subs |= group
        for sub in subs:
            sub.close()
