"""The HTTP load generator: keep-alive ``POST /tasks`` from N concurrent requesters.

``python -m benchmarks.loadgen --url http://127.0.0.1:PORT/tasks --client aiohttp
--concurrency 64 --requests 100000 --seconds 5 [--server-pid PID]`` keeps
``--concurrency`` connections alive, each with one request in flight: it warms
them up, then sends requests one after another until ``--requests`` were sent
or ``--seconds`` have passed, whichever comes first. Each body is
``{"data": {"n": i}}``.

Two clients do the same thing at different costs:

``aiohttp``
    One ``ClientSession`` (keep-alive ``TCPConnector(limit=concurrency)``) shared
    by ``--concurrency`` coroutines. It spends more CPU per request than an
    aiohttp *server* does, so on two cores it can be the bottleneck.
``raw``
    ``--concurrency`` ``asyncio.Protocol`` connections writing a pre-encoded
    request and parsing only the status line and ``Content-Length``: a few
    microseconds per request, so the server under test is what saturates.

It prints one ``BENCH-RESULT {json}`` line: requests per second (completed
responses over the measured wall time; errors and non-2xx are counted apart and
excluded), per-request latency percentiles, its own CPU use and peak RSS, and,
with ``--server-pid``, the server's CPU use over the same interval, which shows
which side was the bottleneck. Only loopback URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp

from .common import cpu_seconds_of, cpu_seconds_self, emit, now, peak_rss_self, percentile, run

HEADERS = {"Content-Type": "application/json"}
#: Request bodies, cycled: ``{"data": {"n": i}}``.
BODIES = [b'{"data":{"n":%d}}' % i for i in range(1024)]


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback interface."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise SystemExit(f"loadgen: cannot resolve {host!r}: {exc}") from None
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise SystemExit(f"loadgen: refusing non-loopback target {url} ({address})")


class Tally:
    """What one measured phase saw: latencies of 2xx answers, status counts, errors."""

    def __init__(self, limit: int, seconds: float, record: bool) -> None:
        self.limit = limit
        self.deadline = now() + seconds
        self.record = record
        self.sent = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}

    def take(self) -> bool:
        """Claim the next request; ``False`` once the count or the time is used up."""
        if self.sent >= self.limit or now() >= self.deadline:
            return False
        self.sent += 1
        return True

    def answered(self, status: int, started: float) -> None:
        if self.record:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if 200 <= status < 300:
                self.latencies.append(now() - started)


async def aiohttp_phase(url: str, concurrency: int, tally: Tally) -> None:
    """``concurrency`` coroutines sharing one keep-alive ``ClientSession``."""
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )

    async def requester() -> None:
        while tally.take():
            body = BODIES[tally.sent % len(BODIES)]
            started = now()
            try:
                async with session.post(url, data=body, headers=HEADERS) as response:
                    await response.read()
                    tally.answered(response.status, started)
            except (aiohttp.ClientError, TimeoutError):
                tally.errors += 1

    async with session:
        await asyncio.gather(*(requester() for _ in range(concurrency)))


class RawConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection sending a request as soon as the last is answered.

    Understands just enough HTTP for the two servers measured here: a status
    line and a ``Content-Length`` body. Anything else is an error that closes it.
    """

    def __init__(self, host: str, path: str, tally: Tally, done: asyncio.Future[None]) -> None:
        self._requests = [
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), host.encode(), len(body), body)
            for body in BODIES
        ]
        self._tally = tally
        self._done = done
        self._buffer = b""
        self._started = 0.0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._next()

    def _next(self) -> None:
        assert self._transport is not None
        if not self._tally.take():
            self._transport.close()
            return
        self._started = now()
        self._transport.write(self._requests[self._tally.sent % len(self._requests)])

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buffer[:end].lower()
        marker = head.find(b"\r\ncontent-length:")
        if marker < 0 or not head.startswith(b"http/1.1 "):
            self._fail()
            return
        value_start = marker + len(b"\r\ncontent-length:")
        value_end = head.find(b"\r\n", value_start)
        length = int(head[value_start : value_end if value_end >= 0 else None])
        if len(self._buffer) < end + 4 + length:
            return
        self._buffer = self._buffer[end + 4 + length :]
        self._tally.answered(int(head[9:12]), self._started)
        self._next()

    def _fail(self) -> None:
        self._tally.errors += 1
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)


async def raw_phase(url: str, concurrency: int, tally: Tally) -> None:
    """``concurrency`` keep-alive connections, each with one request in flight."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    waits: list[asyncio.Future[None]] = []
    for _ in range(concurrency):
        done = loop.create_future()
        waits.append(done)
        await loop.create_connection(
            partial(RawConnection, parts.netloc, parts.path or "/", tally, done), host, port
        )
    async with asyncio.timeout(max(30.0, tally.deadline - now() + 30)):
        await asyncio.gather(*waits)


Phase = Callable[[str, int, Tally], Awaitable[None]]
CLIENTS: dict[str, Phase] = {"aiohttp": aiohttp_phase, "raw": raw_phase}


async def load(
    url: str,
    *,
    client: str,
    concurrency: int,
    requests: int,
    seconds: float,
    warmup: int,
    server_pid: int | None,
) -> dict[str, Any]:
    """Warm up, then drive ``POST url`` and measure; see the module docstring."""
    phase = CLIENTS[client]
    await phase(url, concurrency, Tally(max(warmup, concurrency), max(2.0, seconds), False))
    tally = Tally(requests, seconds, True)
    server_cpu_before = cpu_seconds_of(server_pid) if server_pid else None
    cpu_before = cpu_seconds_self()
    start = now()
    await phase(url, concurrency, tally)
    elapsed = now() - start
    cpu = cpu_seconds_self() - cpu_before
    server_cpu_after = cpu_seconds_of(server_pid) if server_pid else None
    ok = len(tally.latencies)
    server_cpu = (
        100 * (server_cpu_after - server_cpu_before) / elapsed
        if server_cpu_before is not None and server_cpu_after is not None
        else None
    )
    return {
        "client": client,
        "ok": ok,
        "errors": tally.errors,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "seconds": elapsed,
        "per_second": ok / elapsed,
        "p50_us": percentile(tally.latencies, 50) * 1e6,
        "p99_us": percentile(tally.latencies, 99) * 1e6,
        "concurrency": concurrency,
        "cpu_percent": 100 * cpu / elapsed,
        "server_cpu_percent": server_cpu,
        "peak_rss": peak_rss_self(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--url", required=True, help="full URL to POST to (loopback only)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200_000, help="stop after this many")
    parser.add_argument("--seconds", type=float, default=5.0, help="or after this long")
    parser.add_argument("--warmup", type=int, default=1000, help="unmeasured requests first")
    parser.add_argument("--server-pid", type=int, help="report this process's CPU use too")
    args = parser.parse_args()
    check_loopback(args.url)
    emit(
        run(
            load(
                args.url,
                client=args.client,
                concurrency=args.concurrency,
                requests=args.requests,
                seconds=args.seconds,
                warmup=args.warmup,
                server_pid=args.server_pid,
            )
        )
    )


if __name__ == "__main__":
    main()
