"""A process holding many SSE subscriber connections: ``python -m benchmarks.subscribers``.

``python -m benchmarks.subscribers URL PATH COUNT [--token JWT] [--expect N]``
opens ``COUNT`` keep-alive ``GET PATH`` streams to the loopback server at
``URL`` (at most ``CONNECT_CONCURRENCY`` connecting at once, the open-files
limit raised to its hard limit), prints ``READY <connected>`` once each has
its response head (or failed), then reads until stdin closes or, with
``--expect N``, until every stream has had ``N`` events. It then prints one
``BENCH-RESULT`` line: events received (``data:`` lines), streams the server
closed, its own CPU seconds, and with ``--expect`` the delivery latencies:
each event's ``data`` is the sender's ``time.monotonic()``, a clock every
process on the machine shares. The client is a bare ``asyncio.Protocol`` that
does little per chunk, so what it measures is the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import threading
import time
from typing import cast
from urllib.parse import urlsplit

from .common import cpu_seconds_self, emit, run
from .loadgen import check_loopback

CONNECT_CONCURRENCY = 200


class Stream(asyncio.Protocol):
    """One SSE stream: counts ``data:`` lines; parses them as send times when timing."""

    def __init__(self, request: bytes, timing: bool, group: Group) -> None:
        self.request = request
        self.timing = timing
        self.group = group
        self.head = b""
        self.started = False
        self.tail = b""
        self.events = 0
        self.latencies: list[float] = []
        self.head_done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        if not self.started:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.started = True
            ok = self.head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            if not self.head_done.done():
                self.head_done.set_result(ok)
            data, self.head = self.head[end + 4 :], b""
        buf = self.tail + data
        if self.timing:
            # Chunk-size lines and the chunked framing's CRLFs are not data: lines.
            *lines, self.tail = buf.split(b"\n")
            now = time.monotonic()
            for line in lines:
                if line.startswith(b"data: "):
                    self.latencies.append(now - float(line[6:]))
                    self.events += 1
                    if self.events == self.group.expect:
                        self.group.one_done()
        else:
            # A 4-byte tail cannot hold a whole "data:", so nothing is counted twice.
            self.events += buf.count(b"data:")
            self.tail = buf[-4:]

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


async def subscribe(url: str, path: str, count: int, token: str, expect: int) -> None:
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

    async def connect() -> bool:
        async with gate:
            stream = Stream(request, expect > 0, group)
            try:
                await loop.create_connection(lambda: stream, host, port)
            except OSError:
                return False
            streams.append(stream)
            try:
                return await asyncio.wait_for(stream.head_done, 30)
            except TimeoutError:
                return False

    connected = sum(await asyncio.gather(*(connect() for _ in range(count))))
    if expect and connected < count:
        group.pending -= count - connected
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
    emit(
        {
            "connected": connected,
            "events": sum(s.events for s in streams),
            "closed_by_server": group.closed,
            "complete": sum(1 for s in streams if expect and s.events >= expect),
            "cpu_seconds": cpu_seconds_self(),
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
    args = parser.parse_args()
    check_loopback(args.url)
    raise_fd_limit()
    run(subscribe(args.url, args.path, args.count, args.token, args.expect))


if __name__ == "__main__":
    main()
