"""How often the fan-out flushes: fewer, larger rounds while many read a busy stream.

Real ``Fanout`` hubs on the running loop with real timers; the subscribers read
with ``get`` (their batches wait in their backlogs), so a round's cost is the
hub's own.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from taskserver.push import fanout as fanout_module
from taskserver.push.fanout import Fanout
from taskserver.push.subscription import Batch, Subscription

from .conftest import wait_for

#: How long the steady streams below publish, and how often, in seconds.
SPAN = 0.6
EVERY = 0.002


async def publish_steadily(hub: Fanout[int], span: float = SPAN) -> int:
    """Publish an item every ``EVERY`` seconds for ``span``; the number published."""
    sent = 0
    end = time.monotonic() + span
    while time.monotonic() < end:
        hub.publish(("t",), sent)
        sent += 1
        await asyncio.sleep(EVERY)
    return sent


async def received(sub: Subscription[int], count: int) -> list[int]:
    return [item for _ in range(count) if (item := await sub.get()) is not None]


async def test_many_subscribers_of_a_busy_stream_get_rounds_at_most_every_busy_delay() -> None:
    hub: Fanout[int] = Fanout(max_subscribers=2_000, buffer_size=100_000)
    subs = [hub.subscribe(("t",), key="all") for _ in range(1_000)]
    sent = await publish_steadily(hub)
    hub.flush()
    for sub in (subs[0], subs[-1]):
        assert await received(sub, sent) == list(range(sent))  # all, in order
    # 1,000 subscribers: a round waits BUSY_DELAY; before, about every 5-10 ms (~60 rounds).
    # Besides those: the first one or two rounds carry one item each and go at once (a
    # lone item after a quiet spell), and the flush above ends the last one.
    assert hub.rounds <= SPAN / fanout_module.BUSY_DELAY + 4


async def test_a_lone_subscriber_of_a_busy_stream_still_gets_a_round_every_max_delay() -> None:
    hub: Fanout[int] = Fanout(max_subscribers=10, buffer_size=100_000)
    sub = hub.subscribe(("t",))
    sent = await publish_steadily(hub)
    hub.flush()
    assert await received(sub, sent) == list(range(sent))
    assert hub.rounds >= SPAN / fanout_module.MAX_DELAY


async def test_with_many_subscribers_items_a_round_apart_are_each_flushed_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 10,000 Mercure subscribers of one update every 0.25 s: each round carries one item,
    # so the next is not held back for BUSY_DELAY, only for MAX_DELAY at most.
    # A busy round made to wait 5 s, so a held-back item stands out from a slow machine's
    # stall (the 2,000 subscribers' own wait would be 20 s: BUSY_DELAY bounds it).
    monkeypatch.setattr(fanout_module, "BUSY_DELAY", 5.0)
    monkeypatch.setattr(fanout_module, "WAIT_PER_SUBSCRIBER", 0.01)
    hub: Fanout[int] = Fanout(max_subscribers=5_000, buffer_size=100)
    subs = [hub.subscribe(("t",), key="all") for _ in range(2_000)]
    for item in range(3):
        published = time.monotonic()
        hub.publish(("t",), item)
        assert await received(subs[-1], 1) == [item]
        assert time.monotonic() - published < 2.5
        await asyncio.sleep(fanout_module.MAX_DELAY * 1.5)  # < BUSY_DELAY


class Refusing:
    """A sink whose peer takes no write for the first ``refusals`` tries."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.written: list[int] = []
        self.aborted = False

    def write(self, batch: Batch[int]) -> bool:
        if self.refusals:
            self.refusals -= 1
            return False
        self.written += batch.items
        return True

    def abort(self) -> None:
        self.aborted = True


def refused_round(sink: Refusing) -> tuple[Fanout[int], Subscription[int]]:
    """A hub whose one stream (buffer 10) was handed one round of 50 items by ``sink``."""
    hub: Fanout[int] = Fanout(max_subscribers=1, buffer_size=10)
    sub = hub.subscribe(("t",))
    sub.stream(sink)
    for item in range(50):
        hub.publish(("t",), item)
    hub.flush()
    return hub, sub


async def test_a_stream_that_refuses_one_round_larger_than_its_buffer_is_kept() -> None:
    # A busy hub's round can carry more items than a subscriber's buffer: one refused
    # write of it must not drop a stream that then keeps up.
    sink = Refusing(1)
    _, sub = refused_round(sink)
    assert not sub.overflowed
    await wait_for(lambda: sink.written == list(range(50)), message="the retried write")
    assert not sub.closed


async def test_a_stream_still_refusing_at_the_next_round_is_dropped() -> None:
    sink = Refusing(1_000_000)
    hub, sub = refused_round(sink)
    assert not sub.overflowed
    hub.publish(("t",), 50)
    hub.flush()
    assert sub.overflowed
    assert sub.closed
    assert sink.aborted
