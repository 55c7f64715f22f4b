"""A request head cannot grow without bound (taskserver/web/netguard.py, ``max_head_bytes``).

A real ``taskserver run`` subprocess, real loopback sockets, its memory read from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import orjson

from .test_netguard import (
    SLACK,
    RunServer,
    address,
    body_of,
    close_all,
    header,
    healthz_on,
    open_idle,
    read_until_eof,
    start,
    status_line,
)

#: 100 headers of 8,000 bytes (~800 KB), within aiohttp's per-line bound; never ended.
BIG_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
    b"X-H%d: %s\r\n" % (i, b"a" * 8000) for i in range(100)
)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


async def test_large_unfinished_heads_get_431_and_the_server_stays_small(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-head-timeout", "60")
    host, port = address(server)
    pid = server.proc.pid
    async with aiohttp.ClientSession() as session:
        assert await healthz_on(session, server.url, 20) == 20
    before = peak = rss_mb(pid)
    conns = await open_idle(host, port, 200)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        for _, writer in conns:
            writer.write(BIG_HEAD)
        answers = await asyncio.gather(
            *(read_until_eof(reader, 3 * SLACK) for reader, _ in conns), return_exceptions=True
        )
        peak = max(peak, rss_mb(pid))
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await close_all(conns)
    growth = peak - before
    print(f"server RSS {before:.0f} MB -> peak {peak:.0f} MB with 200 heads of 800 KB")
    # 200 x 64 KiB is 12.5 MB; aiohttp alone held ~2 MB per connection (~400 MB here).
    assert growth < 30, f"RSS grew {growth:.0f} MB"
    for answer in answers:
        assert not isinstance(answer, BaseException), answer
        data, _ = answer
        assert status_line(data) == "HTTP/1.1 431 Request Header Fields Too Large", data[:200]
        assert header(data, "Content-Type") == "application/problem+json"
        assert header(data, "Connection") == "close"
        problem = orjson.loads(body_of(data))
        assert problem["status"] == 431
        assert "max_head_bytes" in problem["detail"]
    async with aiohttp.ClientSession() as session:
        assert await healthz_on(session, server.url, 5) == 5
    assert "Traceback" not in server.log.read_text()


async def test_max_head_bytes_is_the_bound_and_a_head_within_it_is_served(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--max-head-bytes", "20000")
    host, port = address(server)
    # 18 KB of headers in pieces, then the end: served.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for i in range(3):
        await writer.drain()
        writer.write(b"X-H%d: %s\r\n" % (i, b"a" * 6000))
    writer.write(b"Connection: close\r\n\r\n")
    data, _ = await read_until_eof(reader, SLACK)
    await close_all([(reader, writer)])
    assert status_line(data) == "HTTP/1.1 200 OK", data[:200]
    # 24 KB of a head that is not whole yet: 431 at once (no head timeout to wait for).
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for i in range(4):
        await writer.drain()
        writer.write(b"X-H%d: %s\r\n" % (i, b"a" * 6000))
    data, took = await read_until_eof(reader, SLACK)
    await close_all([(reader, writer)])
    assert status_line(data) == "HTTP/1.1 431 Request Header Fields Too Large", data[:200]
    assert took < SLACK
