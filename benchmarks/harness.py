"""What the in-process scenarios share: a served ``TaskServer`` with counting
callbacks, the failure type, and latency summaries (``inproc`` and ``mixed``)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from taskserver import Settings, TaskContext, TaskServer

from .common import now, percentile


def settings_for(db: str, workers: int) -> Settings:
    return Settings(db=db, task_workers=workers, port=0, synchronous="NORMAL", grace_period=5.0)


class Finishes:
    """Counts ``finish`` callbacks and wakes whoever waits for a given count."""

    def __init__(self) -> None:
        self.count = 0
        self._target = -1
        self._reached: asyncio.Event = asyncio.Event()
        #: ``data["seq"]`` -> future resolved with the time ``finish`` ran (latency runs).
        self.waiting: dict[int, asyncio.Future[float]] = {}

    async def task(self, ctx: TaskContext) -> None:
        """The ``task`` callback: an ``async`` no-op."""

    async def finish(self, ctx: TaskContext, result: Any) -> None:
        """The ``finish`` callback: count, and resolve the latency waiter of this task."""
        self.count += 1
        if self.count == self._target:
            self._reached.set()
        if self.waiting:
            future = self.waiting.pop(ctx.data["seq"], None)
            if future is not None and not future.done():
                future.set_result(now())

    async def until(self, target: int, timeout: float) -> bool:
        """Wait until ``target`` finishes were counted; ``False`` on timeout."""
        if self.count >= target:
            return True
        self._target = target
        self._reached.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._reached.wait()
        except TimeoutError:
            return False
        return True


#: Seconds ``server.stop()`` may take before the measurement is declared broken.
STOP_LIMIT = 20.0


class BenchFailed(Exception):
    """The scenario could not be measured; the message says why."""


async def stop_within_limit(server: TaskServer) -> None:
    try:
        async with asyncio.timeout(STOP_LIMIT):
            await server.stop()
    except TimeoutError:
        raise BenchFailed(f"server.stop() did not return within {STOP_LIMIT:g}s") from None


@contextlib.asynccontextmanager
async def serving(
    db: str,
    workers: int,
    finishes: Finishes,
    warnings: list[str],
    setup: Callable[[TaskServer], None] | None = None,
) -> AsyncIterator[TaskServer]:
    """A started ``TaskServer`` with ``finishes``' callbacks, stopped on the way out.

    ``setup`` (declaring queues, say) is called before the server starts. A
    ``stop()`` that hangs after a good measurement becomes a warning in
    ``warnings`` (the figures stand); after a failed one it is only logged.
    """
    server = TaskServer(settings_for(db, workers))
    server.on("task", finishes.task)
    server.on("finish", finishes.finish)
    if setup is not None:
        setup(server)
    await server.start()
    measured = False
    try:
        yield server
        measured = True
    finally:
        try:
            await stop_within_limit(server)
        except BenchFailed as exc:
            if not measured:
                sys.stderr.write(f"also: {exc}\n")
            else:
                warnings.append(str(exc))


def summary(samples: list[float]) -> dict[str, Any]:
    """p50/p99/max of latencies given in seconds, reported in microseconds."""
    return {
        "samples": len(samples),
        "p50_us": percentile(samples, 50) * 1e6,
        "p99_us": percentile(samples, 99) * 1e6,
        "max_us": max(samples) * 1e6 if samples else None,
    }
