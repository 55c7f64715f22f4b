"""Module-level ``cpu_bound`` callbacks for the job tests.

A spawned pool process imports them by name (``tests.jobs_helpers.cpu_pid``), so
they live in this small module, which imports nothing heavy of the tests.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskserver import ProcessTaskContext


def cpu_pid(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Say which process ran the task; ``data["sleep"]`` seconds first, if given."""
    data = ctx.data if isinstance(ctx.data, dict) else {}
    time.sleep(float(data.get("sleep", 0.0)))
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def cpu_crash(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Kill its own process (``os._exit(1)``) on the attempts listed in ``data["crash_on"]``.

    ``data["sleep"]`` seconds first; ``data["pid_file"]`` gets the pid before anything.
    """
    data = ctx.data if isinstance(ctx.data, dict) else {}
    if "pid_file" in data:
        Path(data["pid_file"]).write_text(str(os.getpid()))
    time.sleep(float(data.get("sleep", 0.0)))
    if ctx.attempt in data.get("crash_on", ()):
        os._exit(1)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def cpu_memory(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Touch ``data["mb"]`` MiB, so the process's peak memory grows past a small limit."""
    block = bytearray(int(ctx.data["mb"]) * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    return {"pid": os.getpid(), "size": len(block)}


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # The state letter follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def cpu_span(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Sleep ``data["sleep"]`` seconds; say when (wall clock) and where it ran."""
    start = time.time()
    time.sleep(float(ctx.data["sleep"]))
    return {"pid": os.getpid(), "start": start, "end": time.time()}


def cpu_echo(ctx: ProcessTaskContext) -> dict[str, Any]:
    """Send ``data`` back, with the pid: arguments and results of any size travel."""
    return {"pid": os.getpid(), "data": ctx.data}


class TwoArgumentError(Exception):
    """An exception that pickles but does not load (``__init__`` wants two arguments)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(f"{code}: {why}")


def cpu_raise(ctx: ProcessTaskContext) -> Any:
    """Raise what ``data["raise"]`` names: ``value`` (ValueError), ``two`` (TwoArgumentError);
    with ``data["lambda"]`` return a function, which cannot be sent back."""
    kind = ctx.data.get("raise")
    if kind == "value":
        raise ValueError("bad value in the process")
    if kind == "two":
        raise TwoArgumentError(7, "cannot load")
    return lambda: None
