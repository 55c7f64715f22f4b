"""``Fanout``: fan-out of published items to subscribers, by topic, in coalesced rounds.

``publish`` never waits and does almost nothing: it appends the item to the
round in the making. One *flush* per round (soon after the first item, but no
sooner than ``MIN_INTERVAL`` after the last one nor than ``DUTY`` times its
duration, so fan-out takes at most about a ninth of the loop however many
subscribers read, and never delays a round more than ``MAX_DELAY``; while
items come faster than rounds and many subscribers read, the wait grows with
them, up to ``BUSY_DELAY``, so that each gets fewer, larger writes) hands the
round to the subscribers:

* Subscribers that would receive the same bytes form one *group* (same key:
  same selectors, rights and format). Matching, the ``accept`` filter and the
  encoding run once per item per group, not per subscriber; an item is encoded
  once per format per round, and a group's frames of the round are joined once
  into one ``Batch`` shared, as bytes, by every member.
* A streaming subscriber has a ``Sink``: the flush writes each batch to it at
  once, one write per subscriber per round. A subscriber without one (still
  replaying, or read with ``await sub.get()``) keeps the batches in its backlog.
* A subscriber that cannot keep up (its sink refuses writes because the peer
  has not taken the earlier ones, or nobody reads its backlog) keeps at most
  ``buffer_size`` items, or one round's however many; past that it is *dropped*
  (closed, ``overflowed`` set, its connection aborted) instead of slowing the
  publisher or anyone else. A dropped client reconnects with ``Last-Event-ID``
  and replays from the store.

Items reach each subscriber in publish order (the caller publishes committed
events in id order). The number of subscribers is bounded too; past it
``subscribe`` raises ``ServerBusy``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

from ..errors import ServerBusy
from .subscription import Batch, Encoder, Group, Sink, Subscription

__all__ = ["Batch", "Encoder", "Fanout", "Sink", "Subscription"]

T = TypeVar("T")

#: After a flush that took d seconds the next waits d * DUTY: fan-out ≤ ~1/(1+DUTY) of the loop.
DUTY = 8.0
#: Rounds at most this often, in seconds: a busy stream gets fewer, larger writes.
MIN_INTERVAL = 0.005
#: The longest a round may wait for its flush, in seconds (bounds the delivery latency)
#: while few subscribers read, or items come no faster than one per round.
MAX_DELAY = 0.05
#: While items come faster than rounds, a round waits at least this per subscriber, in
#: seconds: at most ~5,000 writes/s however many read; a write's cost per byte falls as
#: it grows (1,000 /events streams: 31 ns a delivery at 120 KiB writes, 22 at 500 KiB).
WAIT_PER_SUBSCRIBER = 0.0002
#: The longest a round may wait with many subscribers, in seconds (their latency bound).
BUSY_DELAY = 0.2
#: A round this large is flushed at once (bounds the items held between flushes).
MAX_ROUND = 20_000
#: How often subscribers whose sink refused a write are tried again, in seconds.
RETRY_INTERVAL = 0.02


class Fanout(Generic[T]):
    """Routes published items to subscriptions, one flush per round. Never blocks."""

    def __init__(self, *, max_subscribers: int, buffer_size: int) -> None:
        self.max_subscribers = max_subscribers
        self.buffer_size = buffer_size
        self._count = 0
        self._groups: dict[Hashable, Group[T]] = {}
        self._all: dict[Group[T], None] = {}
        self._exact: dict[str, dict[Group[T], None]] = {}
        self._predicates: dict[Group[T], None] = {}
        self._round: list[tuple[tuple[str, ...], T]] = []
        self._flush_at = 0.0  # monotonic time before which no flush starts
        self._flush_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.Handle | None = None
        #: Subscribers whose sink refused a write: tried again before each round.
        self._stalled: dict[Subscription[T], None] = {}
        #: Items published (every call, subscribers or not).
        self.published = 0
        #: Subscribers dropped because they could not keep up.
        self.dropped = 0
        #: Rounds flushed (each is one write per subscriber that had something).
        self.rounds = 0

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"<Fanout subscribers={self._count}/{self.max_subscribers} "
            f"groups={len(self._groups)} published={self.published} rounds={self.rounds} "
            f"dropped={self.dropped} stalled={len(self._stalled)}>"
        )

    def subscribe(
        self,
        topics: Iterable[str] = (),
        *,
        match_all: bool = False,
        match: Callable[[str], bool] | None = None,
        key: Hashable = None,
        accept: Callable[[T], bool] | None = None,
        encode: Encoder[T] | None = None,
    ) -> Subscription[T]:
        """Register a subscriber for ``topics`` (exact), everything, or a predicate.

        ``accept`` filters the matching items; ``encode`` makes an item's frame
        (needed to ``stream``). Subscribers with the same ``key`` share one group:
        the key must name everything that decides what they receive (topics,
        predicate, ``accept``, ``encode``); the first subscriber's arguments
        serve them all. Without a key the subscriber gets a group of its own.

        Raises ``ServerBusy`` when ``max_subscribers`` are connected. The caller
        must ``close()`` the subscription when done (in a ``finally``).
        """
        if self._count >= self.max_subscribers:
            raise ServerBusy("too many open event streams", retry_after=5.0)
        group = self._groups.get(key) if key is not None else None
        if group is None:
            group = Group(key, frozenset(topics), match_all, match, accept, encode)
            if key is not None:
                self._groups[key] = group
            if group.match_all:
                self._all[group] = None
            if group.match is not None:
                self._predicates[group] = None
            for topic in group.exact:
                self._exact.setdefault(topic, {})[group] = None
        sub = Subscription(self, group, self.buffer_size)
        group.subs[sub] = None
        self._count += 1
        return sub

    def _stall(self, sub: Subscription[Any], *, retry: bool = False) -> None:
        """``sub``'s sink refused a write: try it again before each round (or soon)."""
        self._stalled[sub] = None
        if retry:
            self._retry_soon()

    def _forget(self, sub: Subscription[Any]) -> None:
        self._count -= 1
        if sub.overflowed:
            self.dropped += 1
        self._stalled.pop(sub, None)
        group: Group[T] = sub._group
        group.subs.pop(sub, None)
        if group.subs:
            return
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        self._all.pop(group, None)
        self._predicates.pop(group, None)
        for topic in group.exact:
            groups = self._exact.get(topic)
            if groups is not None:
                groups.pop(group, None)
                if not groups:
                    del self._exact[topic]

    def publish(self, topics: tuple[str, ...], item: T) -> None:
        """Hand ``item`` to every subscriber matching any of ``topics``, once each.

        Delivered with the round's flush, in publish order; call it with
        committed items only, in id order (e.g. each commit's events, or rows
        another node committed, read back from the database).
        """
        self.published += 1
        if not self._count:
            return
        self._round.append((topics, item))
        if len(self._round) >= MAX_ROUND:
            self.flush()
        elif self._flush_handle is None:
            loop = asyncio.get_running_loop()
            wait = self._flush_at - time.monotonic()
            if wait > 0:
                self._flush_handle = loop.call_later(wait, self.flush)
            else:
                self._flush_handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Deliver the round: match and encode once per group, one write per subscriber."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        started = time.monotonic()
        if self._stalled:
            self._retry()
        round_, self._round = self._round, []
        touched: dict[Group[T], tuple[list[T], list[bytes]]] = {}
        encoded: dict[tuple[Encoder[T] | None, int], bytes | None] = {}
        for index, (topics, item) in enumerate(round_):
            for group in self._targets(topics):
                if group.accept is not None and not group.accept(item):
                    continue
                frame = b""
                if group.encode is not None:
                    cached = (group.encode, index)
                    if cached in encoded:
                        made = encoded[cached]
                    else:
                        made = encoded[cached] = group.encode(item)
                    if made is None:
                        continue
                    frame = made
                got = touched.get(group)
                if got is None:
                    touched[group] = ([item], [frame])
                else:
                    got[0].append(item)
                    got[1].append(frame)
        for group, (items, frames) in touched.items():
            batch = Batch(items, frames)
            for sub in list(group.subs):
                sub.deliver(batch)
        if round_:
            self.rounds += 1
        finished = time.monotonic()
        self._flush_at = finished + self._wait(len(round_), finished - started)
        if self._stalled:
            self._retry_soon()

    def _wait(self, items: int, took: float) -> float:
        """How long after a flush of ``items`` that ``took`` seconds the next one may start.

        ``DUTY`` times the flush (fan-out takes at most ~1/(1+DUTY) of the loop), at
        least ``MIN_INTERVAL``, at most ``MAX_DELAY``. When the round carried more
        than one item (they come faster than rounds) and many subscribers read, at
        least ``WAIT_PER_SUBSCRIBER`` each and at most ``BUSY_DELAY``: fewer, larger
        writes. A lone item after a quiet spell is flushed at once.
        """
        if not items:
            return 0.0
        wait = max(MIN_INTERVAL, took * DUTY)
        if items == 1:
            return min(MAX_DELAY, wait)
        busy = min(BUSY_DELAY, self._count * WAIT_PER_SUBSCRIBER)
        return min(max(MAX_DELAY, busy), max(wait, busy))

    def _targets(self, topics: tuple[str, ...]) -> Iterable[Group[T]]:
        """The groups matching any of ``topics``, each once."""
        exact = self._exact
        if not self._predicates and len(topics) == 1:
            groups = exact.get(topics[0])
            if not groups:
                return self._all
            return {**self._all, **groups} if self._all else groups
        targets = dict(self._all)
        for topic in topics:
            groups = exact.get(topic)
            if groups:
                targets.update(groups)
            for group in self._predicates:
                if group not in targets and group.match is not None and group.match(topic):
                    targets[group] = None
        return targets

    def _retry(self) -> None:
        """Try the stalled subscribers again, in order; keep those still refused."""
        stalled, self._stalled = self._stalled, {}
        for sub in stalled:
            if not sub.drain():
                self._stalled[sub] = None

    def _retry_soon(self) -> None:
        if self._retry_handle is None:
            loop = asyncio.get_running_loop()
            self._retry_handle = loop.call_later(RETRY_INTERVAL, self._retry_later)

    def _retry_later(self) -> None:
        self._retry_handle = None
        if self._stalled:
            self._retry()
        if self._stalled:
            self._retry_soon()

    def close(self) -> None:
        """Close every subscription (server shutdown): streams end, clients reconnect."""
        for group in (
            list(self._all)
            + list(self._predicates)
            + [g for groups in self._exact.values() for g in groups]
        ):
            for sub in list(group.subs):
                sub.close()
        for handle in (self._flush_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        self._flush_handle = self._retry_handle = None
        self._round.clear()
