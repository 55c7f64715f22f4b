"""Process-wide interpreter tuning while a server runs, undone when it stops.

Two settings, each measured (README, "Benchmarks"):

* ``gil_switch_interval``: how long a thread may hold the GIL while another waits.
  Python's 5 ms would keep the SQLite writer thread waiting behind a busy event
  loop after every statement, and every caller waits for its commit.
* ``gc_threshold``: allocations between two young-generation collections of the
  cyclic garbage collector (Python's is 700). Each request and task allocates
  a few dozen containers, so at 700 the collector ran every few requests. What
  exists when the server starts (modules, the application) is frozen out of the
  collector's sweeps (``gc.freeze``), which then only walk what the server made
  since. Cycles are still collected, a little later; peak RSS under HTTP load
  did not change (93 MiB either way).

Both are global to the process: a server embedded in a bigger application tunes
it too, which is why each can be turned off (0) and why ``undo`` restores what
was there before.
"""

from __future__ import annotations

import gc
import sys


class RuntimeTuning:
    """Applies the tuning on ``apply()`` and restores Python's previous values on ``undo()``."""

    def __init__(self, switch_interval: float, gc_threshold: int) -> None:
        self._switch_interval = switch_interval
        self._gc_threshold = gc_threshold
        self._saved_interval: float | None = None
        self._saved_threshold: tuple[int, int, int] | None = None

    def apply(self) -> None:
        if self._switch_interval:
            self._saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(self._switch_interval)
        if self._gc_threshold:
            self._saved_threshold = gc.get_threshold()
            _, older, oldest = self._saved_threshold
            gc.freeze()
            gc.set_threshold(self._gc_threshold, older, oldest)

    def undo(self) -> None:
        if self._saved_interval is not None:
            sys.setswitchinterval(self._saved_interval)
            self._saved_interval = None
        if self._saved_threshold is not None:
            gc.set_threshold(*self._saved_threshold)
            gc.unfreeze()
            self._saved_threshold = None
