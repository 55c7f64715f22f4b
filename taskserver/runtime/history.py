"""The last hour, a minute at a time: throughput, failures and queue wait.

A ring of ``MINUTES`` buckets kept in memory from the server's own counters (what
workers report), for the dashboard's charts; it costs one clock read and a few
additions per task start and end, and is empty again after a restart.
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

    def __repr__(self) -> str:
        used = sum(1 for m in self._ring if m.at >= 0)
        return f"<History {used}/{MINUTES} minutes>"

    def _bucket(self) -> _Minute:
        minute = int(self._clock() // 60)
        bucket = self._ring[minute % MINUTES]
        if bucket.at != minute:
            bucket.reset(minute)
        return bucket

    def started(self, waited: float) -> None:
        """A task started after waiting ``waited`` seconds since it was due."""
        bucket = self._bucket()
        bucket.started += 1
        waited = max(0.0, waited)
        bucket.wait_total += waited
        if waited > bucket.wait_max:
            bucket.wait_max = waited

    def succeeded(self) -> None:
        self._bucket().succeeded += 1

    def failed(self) -> None:
        self._bucket().failed += 1

    def retried(self) -> None:
        self._bucket().retried += 1

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
