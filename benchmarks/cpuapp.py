"""Apps for the ``cpu`` section: a pure-Python spin of ``data["n"]`` iterations.

``taskserver run --app benchmarks.cpuapp:process_setup`` runs it as a
``cpu_bound`` callback (in a worker process); ``thread_setup`` as a plain
function (in a thread). Each task's result is ``{"ms": ...}``, how long its
``spin`` took where it ran, so dispatch is what the server adds around it.
"""

from __future__ import annotations

import time

from taskserver import ProcessTaskContext, SyncTaskContext, TaskServer

from .apps import noop_finish


def spin(n: int) -> int:
    """``n`` iterations of integer work holding the GIL throughout."""
    x = 0
    for i in range(n):
        x ^= i * 7
    return x & 0xFFFF


def timed_spin(n: int) -> dict[str, float]:
    """Run ``spin(n)``; the result is how long it took, in ms, where it ran."""
    started = time.perf_counter()
    spin(n)
    return {"ms": (time.perf_counter() - started) * 1000}


def spin_process(ctx: ProcessTaskContext) -> dict[str, float]:
    """The ``cpu_bound`` task callback."""
    return timed_spin(int(ctx.data["n"]))


def spin_thread(ctx: SyncTaskContext) -> dict[str, float]:
    """The thread task callback."""
    return timed_spin(int(ctx.data["n"]))


def process_setup(server: TaskServer) -> None:
    """``--app benchmarks.cpuapp:process_setup``: ``spin`` in a process worker."""
    server.on("task", spin_process, cpu_bound=True)
    server.on("finish", noop_finish)


def thread_setup(server: TaskServer) -> None:
    """``--app benchmarks.cpuapp:thread_setup``: ``spin`` in a thread."""
    server.on("task", spin_thread)
    server.on("finish", noop_finish)
