"""Process slots for CPU-bound callbacks: one process each, recycled, crash-isolated.

``concurrent.futures.ProcessPoolExecutor`` breaks *as a whole* when one of its
processes dies: every task in it fails. So each slot here is its own
single-process executor: a crash (or a timeout/cancel, which kills the process)
costs only the task that slot ran, and the slot is replaced. A slot is also
replaced after ``max_tasks`` tasks or once its process's peak memory passes
``max_memory_mb`` (Swoole's ``task_max_request``, Messenger's ``--limit`` and
``--memory-limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import WorkerCrashed

log = logging.getLogger(__name__)


def _measured(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    # Runs in the child: the result and the child's peak RSS in KiB (Linux units).
    return fn(*args), _peak_kib()


def _peak_kib() -> int:
    """This process's own peak RSS in KiB.

    Linux's ``ru_maxrss`` survives fork and exec: a spawned child reports at least
    its parent's peak, so a server larger than the limit recycled every process.
    ``VmHWM`` belongs to this process's memory alone.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass  # not Linux: ru_maxrss is the process's own there
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class _Slot:
    __slots__ = ("executor", "index", "tasks")

    def __init__(self, index: int, executor: ProcessPoolExecutor) -> None:
        self.index = index
        self.executor = executor
        self.tasks = 0


class ProcessSlots:
    """``size`` single-process executors; ``run`` borrows one for one call."""

    def __init__(
        self,
        size: int,
        *,
        max_tasks: int = 0,
        max_memory_mb: int = 0,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.size = size
        self._max_tasks = max_tasks
        self._max_kib = max_memory_mb * 1024
        self._initializer = initializer
        self._initargs = initargs
        # spawn, not fork: this process has threads (SQLite, executors) a fork would copy.
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i, self._new_executor()) for i in range(size)]
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        for slot in self._slots:
            self._free.put_nowait(slot)
        self.recycled = 0
        self.crashed = 0

    def __repr__(self) -> str:
        return (
            f"<ProcessSlots free={self._free.qsize()}/{self.size} "
            f"recycled={self.recycled} crashed={self.crashed}>"
        )

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1, mp_context=self._context, initializer=self._initializer, initargs=self._initargs
        )

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a slot's process and return its result.

        Raises ``WorkerCrashed`` when the process dies. When the await is
        cancelled (a timeout, a cancel), the process is killed and replaced, so
        CPU-bound work really stops.
        """
        slot = await self._free.get()
        replace = False
        try:
            future = asyncio.get_running_loop().run_in_executor(slot.executor, _measured, fn, *args)
            try:
                result, peak_kib = await future
            except BrokenProcessPool:
                self.crashed += 1
                replace = True
                raise WorkerCrashed("the process running the task died") from None
            except asyncio.CancelledError:
                replace = True
                raise
            slot.tasks += 1
            if self._max_tasks and slot.tasks >= self._max_tasks:
                replace = True
            if self._max_kib and peak_kib > self._max_kib:
                log.info(
                    "process slot %d used %d MiB, over the limit: recycling",
                    slot.index,
                    peak_kib // 1024,
                )
                replace = True
            return result
        finally:
            if replace:
                self._replace(slot)
            self._free.put_nowait(slot)

    def _replace(self, slot: _Slot) -> None:
        old = slot.executor
        # The executor API cannot stop a running call; killing its process can.
        for process in list(getattr(old, "_processes", {}).values()):
            with contextlib.suppress(Exception):
                process.kill()
        old.shutdown(wait=False, cancel_futures=True)
        slot.executor = self._new_executor()
        slot.tasks = 0
        self.recycled += 1

    def shutdown(self) -> None:
        """Stop every process (running calls are killed)."""
        for slot in self._slots:
            for process in list(getattr(slot.executor, "_processes", {}).values()):
                with contextlib.suppress(Exception):
                    process.kill()
            slot.executor.shutdown(wait=False, cancel_futures=True)
