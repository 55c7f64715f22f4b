"""Process slots for CPU-bound callbacks: one warm process each, recycled, crash-isolated.

Each slot is one long-lived process started with the pool (``spawn``) and two
pipes: the loop writes a call (``pickle`` of the function and its arguments,
length-prefixed) without blocking and reads the answer when the pipe is
readable (``add_reader``). No thread and no process is set up per task, and a
call costs two pipe writes and two wake-ups (``concurrent.futures``'
``ProcessPoolExecutor`` hands each call through a feeder thread and a
management thread, and breaks *as a whole* when one of its processes dies).

A crash (the pipe closes mid-call) costs only the task that slot ran; a
timeout or a cancel kills the process. Either way the slot starts a new one.
A slot is also replaced after ``max_tasks`` tasks or once its process's peak
memory passes ``max_memory_mb`` (Swoole's ``task_max_request``, Messenger's
``--limit`` and ``--memory-limit``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import resource
import signal
import struct
import traceback
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from ..errors import WorkerCrashed

log = logging.getLogger(__name__)

#: A frame: its length (8 bytes, network order), then that many bytes of pickle.
_HEADER = struct.Struct("!Q")
#: Bytes read from a pipe at a time (Linux pipes hold 64 KiB).
_READ = 1 << 16


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception a slot's process raised: its traceback there."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


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


def _read_exactly(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, min(size, _READ))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _answer(ok: bool, value: Any, measure: bool) -> bytes:
    """The pickled answer ``(ok, value or (exception, traceback text), peak KiB or 0)``."""
    peak = _peak_kib() if measure else 0
    try:
        data = pickle.dumps((ok, value, peak), pickle.HIGHEST_PROTOCOL)
        if not ok:
            pickle.loads(data)  # an exception whose __init__ takes other arguments won't load
        return data
    except Exception as exc:  # the result or the exception does not travel: say so
        text = "".join(traceback.format_exception(exc))
        error = TypeError(f"the process could not send its answer back: {exc!r}")
        if not ok:
            text = f"{value[1]}\n{text}"
        return pickle.dumps((False, (error, text), peak), pickle.HIGHEST_PROTOCOL)


def _serve(
    calls: Connection,
    answers: Connection,
    measure: bool,
    initializer: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A slot's process: run the calls the pipe brings, one at a time, until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us, not a terminal's ^C
    if initializer is not None:
        initializer(*initargs)
    read, write = calls.fileno(), answers.fileno()
    while True:
        try:
            (size,) = _HEADER.unpack(_read_exactly(read, _HEADER.size))
            answer = _run(_read_exactly(read, size), measure)
        except EOFError:
            return  # the server closed the pipe: recycled, or it is gone
        _write_all(write, _HEADER.pack(len(answer)) + answer)


def _run(call: bytes, measure: bool) -> bytes:
    """One call, run; its answer, pickled (the call's objects go when this returns)."""
    try:
        fn, args = pickle.loads(call)
        return _answer(True, fn(*args), measure)
    except BaseException as exc:  # SystemExit too costs only this task
        text = "".join(traceback.format_exception(exc))
        return _answer(False, (exc, text), measure)


class _Gone(Exception):
    """The slot's process had died before the call was sent (its pipe has no reader)."""


class _Slot:
    """One process and the parent's ends of its two pipes; at most one call at a time."""

    __slots__ = ("_answer", "_buffer", "_future", "_pending", "calls", "index", "process", "tasks")

    def __init__(self, index: int) -> None:
        self.index = index
        self.tasks = 0
        self.process: BaseProcess | None = None
        self.calls: Connection | None = None  # we write calls here
        self._answer: Connection | None = None  # and read answers here
        self._buffer = bytearray()
        self._pending = memoryview(b"")
        self._future: asyncio.Future[tuple[bool, Any, int]] | None = None

    def start(self, context: Any, measure: bool, initializer: Any, initargs: Any) -> None:
        """Start a new process for this slot (the old one must be stopped)."""
        call_read, call_write = context.Pipe(duplex=False)
        answer_read, answer_write = context.Pipe(duplex=False)
        process = context.Process(
            target=_serve,
            args=(call_read, answer_write, measure, initializer, initargs),
            name=f"taskserver-process-{self.index}",
        )
        process.start()
        call_read.close()  # the child's ends: closed here, so its death reads as EOF
        answer_write.close()
        os.set_blocking(call_write.fileno(), False)
        os.set_blocking(answer_read.fileno(), False)
        self.process, self.calls, self._answer = process, call_write, answer_read
        self.tasks = 0

    async def call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any, int]:
        """Send one call and wait for its answer; ``WorkerCrashed`` if the process dies,
        ``_Gone`` if it had died before (nothing was sent: the call may go elsewhere)."""
        assert self.calls is not None
        assert self._answer is not None
        data = pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL)  # may raise: nothing sent
        frame = _HEADER.pack(len(data)) + data
        write, read = self.calls.fileno(), self._answer.fileno()
        try:
            sent = os.write(write, frame)
        except BlockingIOError:
            sent = 0
        except BrokenPipeError:  # no reader: the process is gone
            raise _Gone from None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any, int]] = loop.create_future()
        self._future = future
        self._buffer.clear()
        self._pending = memoryview(frame)[sent:]
        if self._pending:  # the pipe is full (a large call): the rest as it drains
            loop.add_writer(write, self._send)
        loop.add_reader(read, self._receive)
        try:
            return await future
        finally:
            self._future = None
            self._buffer = bytearray()  # a large answer's memory goes with it
            loop.remove_reader(read)
            if self._pending:
                loop.remove_writer(write)
                self._pending = memoryview(b"")

    def _send(self) -> None:
        assert self.calls is not None
        try:
            while self._pending:
                self._pending = self._pending[os.write(self.calls.fileno(), self._pending) :]
        except BlockingIOError:
            return  # the pipe is full: the writer callback sends the rest
        except OSError:  # EPIPE: the process is gone
            self._pending = memoryview(b"")
            self._fail()
            return
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_writer(self.calls.fileno())

    def _receive(self) -> None:
        assert self._answer is not None
        buffer = self._buffer
        closed = False
        try:
            while chunk := os.read(self._answer.fileno(), _READ):
                buffer += chunk
            closed = True  # EOF: the process is gone (maybe right after answering)
        except BlockingIOError:
            pass
        except OSError:
            closed = True
        header = _HEADER.size
        end = header + _HEADER.unpack_from(buffer)[0] if len(buffer) >= header else 1 << 62
        if len(buffer) < end:
            if closed:
                self._fail()
            return
        future = self._future
        if future is None or future.done():
            return
        try:
            answer = pickle.loads(buffer[header:end])
        except Exception as exc:  # a result that pickled there but does not load here
            error = TypeError(f"the answer of the process could not be read: {exc!r}")
            answer = (False, (error, "".join(traceback.format_exception(exc))), 0)
        future.set_result(answer)

    def _fail(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_exception(WorkerCrashed("the process running the task died"))

    def stop(self, *, kill: bool = True) -> None:
        """Close the pipes: an idle process then exits by itself (``kill=False``: what it
        still sends, progress say, gets out first); ``kill`` stops a running call too."""
        if kill and self.process is not None:
            with contextlib.suppress(Exception):
                self.process.kill()
        for conn in (self.calls, self._answer):
            if conn is not None:
                conn.close()
        self.process = self.calls = self._answer = None


#: Pools whose processes outlive them unless shut down (see ``_shut_down_all``).
_LIVE: weakref.WeakSet[ProcessSlots] = weakref.WeakSet()


def _shut_down_all() -> None:
    # multiprocessing's exit hook joins every child process, and ours wait for their
    # pipe to close: a pool never shut down (a server not stopped) hung the exit.
    # atexit runs the last registered first; multiprocessing.util registered at import.
    for pool in list(_LIVE):
        pool.shutdown()


atexit.register(_shut_down_all)


class ProcessSlots:
    """``size`` warm processes; ``run`` borrows one for one call."""

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
        self._slots = [_Slot(i) for i in range(size)]
        _LIVE.add(self)
        for slot in self._slots:
            self._start(slot)  # warm before the first task
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

    def _start(self, slot: _Slot) -> None:
        slot.start(self._context, bool(self._max_kib), self._initializer, self._initargs)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a slot's process and return its result.

        Raises what ``fn`` raised (its traceback in the process as ``__cause__``),
        ``WorkerCrashed`` when the process dies. When the await is cancelled (a
        timeout, a cancel), the process is killed and replaced, so CPU-bound work
        really stops.
        """
        slot = await self._free.get()
        replace = retire = False
        try:
            try:
                try:
                    ok, value, peak_kib = await slot.call(fn, args)
                except _Gone:  # died while idle (killed from outside): not this task's fault
                    self._replace(slot)
                    ok, value, peak_kib = await slot.call(fn, args)
            except _Gone:  # and its replacement too, at once
                self.crashed += 1
                replace = True
                raise WorkerCrashed("the process for the task died as it started") from None
            except WorkerCrashed:
                self.crashed += 1
                replace = True
                raise
            except asyncio.CancelledError:
                replace = True
                raise
            slot.tasks += 1
            if self._max_tasks and slot.tasks >= self._max_tasks:
                retire = True
            if self._max_kib and peak_kib > self._max_kib:
                log.info(
                    "process slot %d used %d MiB, over the limit: recycling",
                    slot.index,
                    peak_kib // 1024,
                )
                retire = True
            if not ok:
                exc, text = value
                exc.__cause__ = RemoteTraceback(text)
                raise exc
            return value
        finally:
            if replace or retire:
                self._replace(slot, kill=replace)
            self._free.put_nowait(slot)

    def _replace(self, slot: _Slot, *, kill: bool = True) -> None:
        slot.stop(kill=kill)
        self._start(slot)
        self.recycled += 1

    def shutdown(self) -> None:
        """Stop every process (running calls are killed)."""
        for slot in self._slots:
            slot.stop()
