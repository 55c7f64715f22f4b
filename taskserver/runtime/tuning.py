"""Process-wide interpreter tuning while a server runs, undone when it stops.

Two settings, each measured (README, "Benchmarks"):

* ``gil_switch_interval``: how long a thread may hold the GIL while another waits.
  Python's 5 ms would keep the SQLite writer thread waiting behind a busy event
  loop after every statement, and every caller waits for its commit. While two or
  more task callbacks run in threads at once (``run_in_thread``), the interval
  Python had before is back: threads that hold the GIL in turn pay a hand-over at
  every interval (two threads of pure-Python work ran 1.18x slower per task than
  one at 0.1 ms, 1.01x at 5 ms), and the loop then waits behind work that is done.
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
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class RuntimeTuning:
    """Applies the tuning on ``apply()`` and restores Python's previous values on ``undo()``."""

    def __init__(self, switch_interval: float, gc_threshold: int) -> None:
        self._switch_interval = switch_interval
        self._gc_threshold = gc_threshold
        self._saved_interval: float | None = None
        self._saved_threshold: tuple[int, int, int] | None = None
        #: task callbacks running in threads now (``run_in_thread``), under ``_lock``
        self._threads = 0
        self._lock = threading.Lock()

    def apply(self) -> None:
        if self._switch_interval:
            with self._lock:
                self._saved_interval = sys.getswitchinterval()
                if self._threads < 2:
                    sys.setswitchinterval(self._switch_interval)
        if self._gc_threshold:
            self._saved_threshold = gc.get_threshold()
            _, older, oldest = self._saved_threshold
            gc.freeze()
            gc.set_threshold(self._gc_threshold, older, oldest)

    def undo(self) -> None:
        with self._lock:
            if self._saved_interval is not None:
                sys.setswitchinterval(self._saved_interval)
                self._saved_interval = None
        if self._saved_threshold is not None:
            gc.set_threshold(*self._saved_threshold)
            gc.unfreeze()
            self._saved_threshold = None

    def run_in_thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn`` (in a task thread), counted: while two or more such calls run at
        once, the switch interval is the one Python had before ``apply``."""
        self._enter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._leave()

    def _enter(self) -> None:
        with self._lock:
            self._threads += 1
            if self._threads == 2 and self._saved_interval is not None:
                sys.setswitchinterval(self._saved_interval)

    def _leave(self) -> None:
        with self._lock:
            self._threads -= 1
            if self._threads == 1 and self._saved_interval is not None:
                sys.setswitchinterval(self._switch_interval)
