"""A process holding many SSE subscriber connections: ``python -m benchmarks.subscribers``.

``python -m benchmarks.subscribers URL PATH COUNT [--token JWT] [--expect N] [--rcvbuf B]``
opens ``COUNT`` keep-alive ``GET PATH`` streams to the loopback server at
``URL`` (at most ``CONNECT_CONCURRENCY`` connecting at once, the open-files
limit raised to its hard limit, ``SO_RCVBUF`` set to ``B`` before connecting),
prints ``READY <connected>`` once each has its response head (or failed), then
reads until stdin closes or, with ``--expect N``, until every stream has had
``N`` events. It then prints one ``BENCH-RESULT`` line: events read (summed
over the streams), bytes received, streams the server closed, its own CPU
seconds (in all, and while reading), the witness stream's ``data:`` count and
last id, and with ``--expect`` the delivery latencies: each event's ``data`` is
the sender's ``time.monotonic()``, a clock every process on the machine shares.

Every stream reads every byte into user space, so the server does all the work
a real subscriber makes it do, but the client does as little as it can beside
the kernel's copy, so what it measures is the server: each stream is an
``asyncio.BufferedProtocol`` reading into one preallocated buffer (nothing
allocated per read), and its count of events read is the id of the last whole
frame it got (the section runs on a fresh store where every event reaches every
stream, in id order). Only one stream, the *witness*, counts its ``data:``
lines as well (scanning every byte costs the client about as much as the copy:
~110 ns an event, against ~35 ns in all for the others); the two agree when
nothing was lost. With ``--expect`` (few events) every ``data:`` line is parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import socket
import sys
import threading
import time
from typing import cast
from urllib.parse import urlsplit

from .common import cpu_seconds_self, emit, run
from .loadgen import check_loopback

CONNECT_CONCURRENCY = 200
#: Bytes read per ``recv_into``: a whole round's write to a stream, in one call.
READ_SIZE = 256 * 1024
#: Each stream's kernel receive buffer: a round that comes while the process is busy with
#: other streams waits there, not in the server (which drops a stream past its own bound).
RCVBUF = 1024 * 1024
#: Bytes kept from one read for the next: more than a whole frame, so the last event's id
#: is at hand at the end.
TAIL = 4096
#: Of the tail, what the witness scans again: one less than ``b"data:"``, so a marker
#: split across reads is counted once, and none twice.
CARRY = len(b"data:") - 1


class Stream(asyncio.BufferedProtocol):
    """One SSE stream read into one preallocated buffer, with nothing allocated per read.

    The kernel copies each read after the tail kept from the last one. Every
    stream's count of events read is the id of its last whole frame (a fresh
    store, task events only: ids 1, 2, ... in order); the *witness* also counts
    its ``data:`` lines with ``bytearray.count`` (scanning every byte costs
    about as much as the kernel's copy, so only it does), which checks that
    the two agree. When timing (the events are few), each ``data:`` line's
    value is parsed as its send time.
    """

    def __init__(self, request: bytes, timing: bool, witness: bool, group: Group) -> None:
        self.request = request
        self.timing = timing
        self.witness = witness
        self.group = group
        self.buffer = bytearray(READ_SIZE)
        self.view = memoryview(self.buffer)
        self.filled = 0  # bytes at the buffer's start kept from earlier reads
        self.started = False
        self.received = 0
        self.events = 0  # data: lines counted (the witness, or timing)
        self.latencies: list[float] = []
        self.head_done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        buf = self.buffer
        scan = max(0, self.filled - CARRY)
        end = self.filled + nbytes
        self.received += nbytes
        if not self.started:
            head = buf.find(b"\r\n\r\n", 0, end)
            if head < 0:
                self.filled = end  # the head is far smaller than the buffer
                return
            self.started = True
            if not self.head_done.done():
                self.head_done.set_result(buf.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")))
            scan = head + 4
        if self.timing:
            self._time(scan, end)
            return
        if self.witness:
            self.events += buf.count(b"data:", scan, end)
        if end > TAIL:
            buf[:TAIL] = buf[end - TAIL : end]
            end = TAIL
        self.filled = end

    def _time(self, start: int, end: int) -> None:
        """Each whole ``data:`` line's value is a send time; a partial line is kept."""
        buf = self.buffer
        last = buf.rfind(b"\n", start, end) + 1  # chunk-size lines and CRLFs are not data:
        now = time.monotonic()
        at = buf.find(b"data: ", start, last)
        while at >= 0:
            eol = buf.find(b"\n", at, last)
            self.latencies.append(now - float(buf[at + 6 : eol]))
            self.events += 1
            if self.events == self.group.expect:
                self.group.one_done()
            at = buf.find(b"data: ", eol, last)
        if last == 0:
            last = start
        rest = end - last
        buf[:rest] = buf[last:end]
        self.filled = rest

    def last_id(self) -> int:
        """The id of the last whole frame read (0 if none): the end of an SSE or Mercure frame."""
        buf, end = self.buffer, self.filled
        frame_end = max(buf.rfind(b"\n\n", 0, end), buf.rfind(b"\n\r\n", 0, end))
        line = buf.rfind(b"\nid: ", 0, frame_end + 1) if frame_end >= 0 else -1
        if line < 0:
            return 0
        eol = buf.find(b"\n", line + 5, frame_end + 1)
        return int(buf[line + 5 : eol])

    def read(self) -> int:
        """Events read: counted when timing, else the last whole frame's id."""
        return self.events if self.timing else self.last_id()

    def connection_lost(self, exc: Exception | None) -> None:
        self.group.closed += 1
        if not self.head_done.done():
            self.head_done.set_result(False)


class Group:
    """All streams of this process and when they are done."""

    def __init__(self, count: int, expect: int) -> None:
        self.expect = expect
        self.pending = count
        self.closed = 0
        self.all_done = asyncio.Event()

    def one_done(self) -> None:
        self.pending -= 1
        if self.pending <= 0:
            self.all_done.set()


async def subscribe(url: str, path: str, count: int, token: str, expect: int, rcvbuf: int) -> None:
    """See the module docstring."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{auth}\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    group = Group(count, expect)
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    streams: list[Stream] = []

    async def connect(index: int) -> bool:
        async with gate:
            stream = Stream(request, expect > 0, index == 0, group)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if rcvbuf:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                await loop.create_connection(lambda: stream, sock=sock)
            except OSError:
                sock.close()
                return False
            streams.append(stream)
            try:
                return await asyncio.wait_for(stream.head_done, 30)
            except TimeoutError:
                return False

    connected = sum(await asyncio.gather(*(connect(i) for i in range(count))))
    if expect and connected < count:
        group.pending -= count - connected
    ready_cpu = cpu_seconds_self()
    print(f"READY {connected}", flush=True)
    stdin_closed = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    waits = [asyncio.ensure_future(stdin_closed.wait())]
    if expect:
        waits.append(asyncio.ensure_future(group.all_done.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    emit(
        {
            "connected": connected,
            "events": sum(s.read() for s in streams),
            "received_bytes": sum(s.received for s in streams),
            "witness_events": sum(s.events for s in streams if s.witness),
            "witness_last_id": sum(s.last_id() for s in streams if s.witness),
            "closed_by_server": group.closed,
            "complete": sum(1 for s in streams if expect and s.events >= expect),
            "cpu_seconds": cpu_seconds_self(),
            "cpu_reading": cpu_seconds_self() - ready_cpu,
            "cpu_user": usage.ru_utime,
            "cpu_system": usage.ru_stime,
            "latencies": [x for s in streams for x in s.latencies],
        }
    )


def raise_fd_limit() -> None:
    """Take every descriptor the process may have: one per connection."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.subscribers", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("path")
    parser.add_argument("count", type=int)
    parser.add_argument("--token", default="")
    parser.add_argument("--expect", type=int, default=0)
    parser.add_argument(
        "--rcvbuf", type=int, default=RCVBUF, help="SO_RCVBUF per stream (0: the kernel's)"
    )
    args = parser.parse_args()
    check_loopback(args.url)
    raise_fd_limit()
    run(subscribe(args.url, args.path, args.count, args.token, args.expect, args.rcvbuf))


if __name__ == "__main__":
    main()
