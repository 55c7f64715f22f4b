"""Small helpers shared by the benchmark processes: timing, percentiles, memory, output."""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

#: Every benchmark process prints exactly one line starting with this, then its JSON result.
RESULT_PREFIX = "BENCH-RESULT "


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop, as ``taskserver run`` does."""
    import uvloop

    return uvloop.run(main)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples``, nearest-rank; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def peak_rss_self() -> int:
    """This process's peak resident set size so far, in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds_self() -> float:
    """User plus system CPU time this process has used so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_of(pid: int) -> int | None:
    """Peak resident set size (``VmHWM``) of a live process, in bytes; ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds_of(pid: int) -> float | None:
    """User plus system CPU time of a live process, in seconds; ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def emit(result: dict[str, Any]) -> None:
    """Print a benchmark process's result for the orchestrator to read."""
    sys.stdout.write(RESULT_PREFIX + orjson.dumps(result).decode() + "\n")
    sys.stdout.flush()


def now() -> float:
    """A monotonic clock with sub-microsecond resolution, in seconds."""
    return time.perf_counter()
