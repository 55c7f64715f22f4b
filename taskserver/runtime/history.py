"""The last hour, a minute at a time: throughput, failures and queue wait.

A ring of ``MINUTES`` buckets kept in memory from the server's own counters (what
workers report), for the dashboard's charts; it costs a comparison and an addition
or two per task start and end (the time comes with the report, no clock read), and
is empty again after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: Buckets kept: one hour.
MINUTES = 60


@dataclass(slots=True)
class _Minute:
    at: int = -1  # the bucket's minute since the epoch; -1: unused
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    wait_total: float = 0.0
    wait_max: float = 0.0

    def reset(self, at: int) -> None:
        self.at, self.started, self.succeeded, self.failed, self.retried = at, 0, 0, 0, 0
        self.wait_total = self.wait_max = 0.0


class History:
    """Per-minute counters of the last ``MINUTES`` minutes; bounded, never grows."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._ring = [_Minute() for _ in range(MINUTES)]
        #: the bucket of the minute last counted in, and that minute's start and end
        self._current = self._ring[0]
        self._from = self._until = 0.0

    def __repr__(self) -> str:
        used = sum(1 for m in self._ring if m.at >= 0)
        return f"<History {used}/{MINUTES} minutes>"

    def _bucket(self, at: float) -> _Minute:
        if self._from <= at < self._until:  # nearly always: the minute of the last count
            return self._current
        minute = int(at // 60)
        bucket = self._ring[minute % MINUTES]
        if bucket.at != minute:
            bucket.reset(minute)
        if at >= self._until:  # a late report (an older minute) does not move the cache back
            self._current, self._from, self._until = bucket, minute * 60.0, minute * 60.0 + 60
        return bucket

    def started(self, at: float, waited: float) -> None:
        """A task started at ``at`` after waiting ``waited`` seconds since it was due."""
        bucket = self._bucket(at)
        bucket.started += 1
        if waited > 0:
            bucket.wait_total += waited
            if waited > bucket.wait_max:
                bucket.wait_max = waited

    def succeeded(self, at: float) -> None:
        self._bucket(at).succeeded += 1

    def failed(self, at: float) -> None:
        self._bucket(at).failed += 1

    def retried(self, at: float) -> None:
        self._bucket(at).retried += 1

    def to_json(self) -> dict[str, object]:
        """The last ``MINUTES`` minutes, oldest first: ``start`` (epoch s of the first),
        and per minute ``started``, ``succeeded``, ``failed``, ``retried``, the mean
        and the longest queue wait (s)."""
        now = int(self._clock() // 60)
        first = now - MINUTES + 1
        rows = []
        for minute in range(first, now + 1):
            bucket = self._ring[minute % MINUTES]
            rows.append(bucket if bucket.at == minute else _Minute())
        return {
            "start": first * 60,
            "step": 60,
            "started": [m.started for m in rows],
            "succeeded": [m.succeeded for m in rows],
            "failed": [m.failed for m in rows],
            "retried": [m.retried for m in rows],
            "wait_mean": [round(m.wait_total / m.started, 4) if m.started else 0 for m in rows],
            "wait_max": [round(m.wait_max, 4) for m in rows],
        }
