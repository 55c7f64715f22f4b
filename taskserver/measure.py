"""Cheap measurements the server keeps as it works, read at scrape time (``web/metrics``).

Everything here runs on the event loop, one caller at a time: plain integers and
lists, no locks, no allocation per observation. The exposition format is not known
here; ``web/metrics.py`` turns these into Prometheus metric families.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

#: Seconds: task run times and queue waits, from a no-op task to a long job.
SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: Seconds a commit takes: a group commit is well under a millisecond to a few.
COMMIT_SECONDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
#: Writes (rows and events) one commit carries.
BATCH_SIZES = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10_000, 100_000)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        #: per bucket, not cumulative; the last one counts values above every bound
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:g}>"

    def observe(self, value: float) -> None:
        """Count ``value`` in its bucket."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(bound, observations <= bound)`` per bucket, ``inf`` last, as Prometheus has it."""
        total = 0
        out = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out
