"""The writer thread: one OS thread that runs the writer connection's calls, in order.

``WriterThread.run(fn, *args)`` hands ``fn`` to the thread and returns a loop future
of its result. It does what ``loop.run_in_executor`` on a one-thread pool did, with
less Python on both sides of each commit: no ``concurrent.futures.Future`` (a
``Condition`` and its lock per call, state copied to a second future), no work item,
no pool bookkeeping; one queue put wakes the thread, one ``call_soon_threadsafe``
wakes the loop. The writer thread needs the GIL for every line of Python it runs,
while the loop's thread holds it most of the time, so each line saved there is a
wait saved too.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class WriterThread:
    """Runs calls one at a time, in the order given, on a thread of its own.

    ``close()`` runs what was handed over before it, then ends the thread. The thread
    is a daemon: a store never closed does not hold up the interpreter's exit (a
    transaction cut short there is rolled back by SQLite, as after ``kill -9``).
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "running" if self._thread.is_alive() else "stopped"
        return f"<WriterThread {self._thread.name} {state}>"

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` on the thread; the future resolves (on this loop) to its result
        or raises its exception. Cancelling the future does not stop a call begun."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        """Finish the calls handed over so far, then stop the thread (blocks until then)."""
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()

    def _serve(self) -> None:
        get = self._calls.get
        while (call := get()) is not None:
            loop, future, fn, args = call
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting caller, as an executor does
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
                loop.call_soon_threadsafe(_deliver, future, result, error)
            del call, future, result, error  # drop references before blocking again


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
