"""A subscriber of the ``Fanout``: its group, its backlog of batches, its sink.

A *batch* is one round's items for one group with their encoded frames, shared
by every member of the group; a *sink* writes a streaming subscriber's batches
to its connection. ``fanout.py`` says how rounds are made and delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

#: An item's frame for one group, or ``None`` when the group does not want it.
Encoder = Callable[[T], bytes | None]


class Owner(Protocol):
    """What a subscription tells its hub (``Fanout``)."""

    def _forget(self, sub: Subscription[Any]) -> None: ...

    def _stall(self, sub: Subscription[Any], *, retry: bool = False) -> None: ...


class Sink(Protocol):
    """Where a streaming subscriber's batches go (``push.sse.TransportSink``)."""

    def write(self, batch: Batch[Any]) -> bool:
        """Write ``batch`` now; ``False`` when the peer has not taken the earlier writes.

        Raises ``ConnectionError`` when the connection is gone.
        """

    def abort(self) -> None:
        """Cut the connection (the subscriber was dropped)."""


class Batch(Generic[T]):
    """One round's items for one group, with their frames; ``data`` is their bytes joined."""

    __slots__ = ("_chunked", "_data", "frames", "items")

    def __init__(self, items: list[T], frames: list[bytes]) -> None:
        self.items = items
        self.frames = frames
        self._data: bytes | None = None
        self._chunked: bytes | None = None

    @property
    def data(self) -> bytes:
        """Every frame, joined once for all the subscribers that get this batch."""
        if self._data is None:
            self._data = b"".join(self.frames)
        return self._data

    @property
    def chunked(self) -> bytes:
        """``data`` as one HTTP/1.1 chunk (``Transfer-Encoding: chunked``), built once."""
        if self._chunked is None:
            data = self.data
            self._chunked = b"%x\r\n%b\r\n" % (len(data), data)
        return self._chunked

    def part(self, keep: Callable[[T], bool]) -> Batch[T]:
        """The items for which ``keep`` holds, with their frames."""
        pairs = [(i, f) for i, f in zip(self.items, self.frames, strict=True) if keep(i)]
        return Batch([i for i, _ in pairs], [f for _, f in pairs])

    @staticmethod
    def merge(batches: Iterable[Batch[T]]) -> Batch[T]:
        items: list[T] = []
        frames: list[bytes] = []
        for batch in batches:
            items += batch.items
            frames += batch.frames
        return Batch(items, frames)


class Group(Generic[T]):
    """Subscribers that receive the same bytes: one topic match and encoding for all."""

    __slots__ = ("accept", "encode", "exact", "key", "match", "match_all", "subs")

    def __init__(
        self,
        key: Hashable,
        exact: frozenset[str],
        match_all: bool,
        match: Callable[[str], bool] | None,
        accept: Callable[[T], bool] | None,
        encode: Encoder[T] | None,
    ) -> None:
        self.key = key
        self.exact = exact
        self.match_all = match_all
        self.match = match
        self.accept = accept
        self.encode = encode
        self.subs: dict[Subscription[T], None] = {}  # insertion-ordered set


class Subscription(Generic[T]):
    """One subscriber: a backlog of batches and, once streaming, a ``Sink``.

    Read it with ``await sub.get()`` until it returns ``None``, or attach a sink
    with ``stream`` and wait for ``closed_wait()``. Close it when done.
    """

    __slots__ = (
        "_backlog",
        "_closed_waiter",
        "_group",
        "_held",
        "_hub",
        "_limit",
        "_offset",
        "_sink",
        "_skip",
        "_until",
        "_waiter",
        "closed",
        "overflowed",
    )

    def __init__(self, hub: Owner, group: Group[T], limit: int) -> None:
        self._hub = hub
        self._group = group
        self._limit = limit
        self._backlog: list[Batch[T]] = []
        self._held = 0  # items in the backlog (not yet read)
        self._offset = 0  # items of the backlog's first batch already read by ``get``
        self._waiter: asyncio.Future[None] | None = None
        self._closed_waiter: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._skip: Callable[[T], bool] | None = None
        self._until: Callable[[T], bool] | None = None
        self.closed = False
        #: Set when the hub dropped this subscriber because it could not keep up.
        self.overflowed = False

    def __repr__(self) -> str:
        state = " overflowed" if self.overflowed else (" closed" if self.closed else "")
        mode = " streaming" if self._sink is not None else ""
        return f"<Subscription buffered={self._held}/{self._limit}{mode}{state}>"

    # --- the hub's side ---------------------------------------------------------------

    def deliver(self, batch: Batch[T]) -> None:
        """Write ``batch`` to the sink, or keep it; past the bound, drop the subscriber."""
        if self.closed:
            return
        sink = self._sink
        if sink is not None and not self._backlog:
            if self._skip is not None or self._until is not None:
                if self._write(batch):
                    return
            else:  # the hot path: a live stream that keeps up
                try:
                    if sink.write(batch):
                        return
                except ConnectionError:
                    self.close()
                    return
        self._backlog.append(batch)
        self._held += len(batch.items)
        # One round is kept however large (its batch is shared with the group, and a busy
        # hub's rounds can carry more than the limit): a second one past it drops.
        if self._held > self._limit and len(self._backlog) > 1:
            self.overflowed = True
            self.close()
            return
        if self._sink is not None:
            self._hub._stall(self)
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def drain(self) -> bool:
        """Write the backlog to the sink as one batch; whether it went (or there was none)."""
        if self.closed or self._sink is None:
            return True
        if self._backlog:
            merged = Batch.merge(self._backlog)
            if self._offset:
                merged = Batch(merged.items[self._offset :], merged.frames[self._offset :])
            if not self._write(merged):
                return False
        self._backlog.clear()
        self._held = self._offset = 0
        return True

    def _write(self, batch: Batch[T]) -> bool:
        """Hand ``batch`` (less what ``skip`` drops, up to what ``until`` ends on) to the sink."""
        if self._skip is not None:
            skip = self._skip
            if skip(batch.items[-1]):
                return True  # all seen in the replay
            if skip(batch.items[0]):
                batch = batch.part(lambda item: not skip(item))
            self._skip = None  # ids only grow: nothing later was replayed
        end = False
        if self._until is not None:
            until = self._until
            last = next((n for n, item in enumerate(batch.items) if until(item)), None)
            if last is not None:
                end = True
                if last + 1 < len(batch.items):
                    batch = Batch(batch.items[: last + 1], batch.frames[: last + 1])
        assert self._sink is not None
        try:
            if not self._sink.write(batch):
                return False
        except ConnectionError:
            self.close()
            return True
        if end:
            self.close()
        return True

    # --- the subscriber's side --------------------------------------------------------

    def stream(
        self,
        sink: Sink,
        *,
        skip: Callable[[T], bool] | None = None,
        until: Callable[[T], bool] | None = None,
    ) -> None:
        """From now on write batches to ``sink``, the backlog first.

        Items for which ``skip`` holds are not written (those already replayed;
        it must hold for a prefix of the items only). The stream ends (the
        subscription closes) after the first item for which ``until`` holds.
        """
        self._sink, self._skip, self._until = sink, skip, until
        if not self.drain():
            self._hub._stall(self, retry=True)

    async def closed_wait(self) -> None:
        """Return once the subscription is closed (the client went, or it was dropped)."""
        if self.closed:
            return
        if self._closed_waiter is None:
            self._closed_waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed_waiter)

    async def get(self) -> T | None:
        """The next item, waiting for one; ``None`` once closed and drained, or overflowed.

        After an overflow the remaining buffer is discarded: the client must
        replay from the store, and would otherwise see a gap.
        """
        while not self._backlog:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def get_nowait(self) -> T | None:
        """The next buffered item, or ``None``."""
        if self.overflowed or not self._backlog:
            return None
        head = self._backlog[0]  # shared with the group: read at an offset, never changed
        item = head.items[self._offset]
        self._offset += 1
        if self._offset == len(head.items):
            self._backlog.pop(0)
            self._offset = 0
        self._held -= 1
        return item

    def close(self) -> None:
        """Stop receiving; ``get`` returns what is buffered, then ``None``. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.overflowed:
            self._backlog.clear()
            self._held = self._offset = 0
            if self._sink is not None:
                self._sink.abort()  # it does not read: a graceful end would wait on it
        self._hub._forget(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self._closed_waiter is not None and not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
