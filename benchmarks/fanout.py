"""Mercure fan-out: N SSE subscribers on one taskserver process, event delivery latency.

``python -m benchmarks.fanout [--subscribers 10000] [--events 20]``

One ``taskserver run`` process (the hub under test) is started with anonymous
subscribers allowed. ``--clients`` subscriber processes open the connections
between them -- real HTTP/1.1 ``GET /.well-known/mercure?topic=...`` streams,
read with a raw asyncio client that costs little -- and report when every stream
has its first ``:`` comment. Then ``--events`` updates are published, one every
``--interval`` seconds (so each fan-out is measured on its own, not as a
burst), each carrying its send time from the shared monotonic clock. Latency is
publish-call to receipt by a subscriber: the durable commit, the fan-out to
every queue, and every socket write. The figure is the p99 over every
(event, subscriber) delivery; the server's peak RSS is printed with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from .bench import BenchError, child_env, serve
from .common import RESULT_PREFIX, emit, percentile

KEY = "!ChangeThisMercureHubJWTSecretKey!"
TOPIC = "https://example.com/fanout"
HUB = "/.well-known/mercure"
#: Connections opened at once per client process: the server's accept backlog is finite.
CONNECT_CONCURRENCY = 200


# --- subscriber process -----------------------------------------------------------------


async def _subscriber(
    host: str, port: int, events: int, latencies: list[float], ready: asyncio.Event
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {HUB}?topic={TOPIC} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Accept: text/event-stream\r\n\r\n".encode()
    )
    # Chunked framing is skipped: every event is written (and so chunked) whole.
    while (line := await reader.readline()) not in (b":\n", b""):
        pass
    ready.set()
    received = 0
    while received < events:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the hub closed a stream early")
        if line.startswith(b"data: "):
            latencies.append(time.monotonic() - float(line[6:]))
            received += 1
    writer.close()


async def _subscribers(url: str, count: int, events: int) -> None:
    host, _, port = url.removeprefix("http://").partition(":")
    latencies: list[float] = []
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    readies = [asyncio.Event() for _ in range(count)]

    async def one(ready: asyncio.Event) -> None:
        async with gate:
            task = asyncio.create_task(_subscriber(host, int(port), events, latencies, ready))
            await asyncio.wait(
                [task, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED
            )
        await task

    streams = [asyncio.create_task(one(ready)) for ready in readies]
    for ready in readies:
        await ready.wait()
    print("READY", flush=True)
    await asyncio.gather(*streams)
    emit({"latencies": latencies})


# --- orchestrator ----------------------------------------------------------------------------


async def _publish(url: str, events: int, interval: float) -> None:
    token = jwt.encode({"mercure": {"publish": [TOPIC]}}, KEY, algorithm="HS256")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        for _ in range(events):
            form = {"topic": TOPIC, "data": repr(time.monotonic())}
            async with session.post(url + HUB, data=form) as response:
                if response.status != 200:
                    raise BenchError(f"publish answered {response.status}")
            await asyncio.sleep(interval)


def _raise_fd_limit() -> None:
    # One descriptor per connection: take all the process may have.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _orchestrate(options: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "taskserver",
        "run",
        "--port=0",
        f"--db={workdir / 'fanout.db'}",
        "--task-workers=0",
        "--heartbeat=60",
        f"--max-subscribers={options.subscribers + 100}",
        # Every stream is a connection too; past max_connections the publisher got 503.
        f"--max-connections={options.subscribers + 200}",
        "--mercure-anonymous=true",
        f"--mercure-publisher-jwt-key={KEY}",
    ]
    with serve(command, cwd=workdir, log=workdir / "server.log", timeout=30) as server:
        share = [options.subscribers // options.clients] * options.clients
        share[0] += options.subscribers - sum(share)
        clients = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.fanout",
                "--serve-subscribers",
                server.url,
                str(n),
                str(options.events),
                env=child_env(),
                stdout=asyncio.subprocess.PIPE,
            )
            for n in share
        ]
        started = time.monotonic()
        for client in clients:
            assert client.stdout is not None
            if (await client.stdout.readline()).strip() != b"READY":
                raise BenchError("a subscriber process failed to connect")
        connect_seconds = time.monotonic() - started
        await _publish(server.url, options.events, options.interval)
        latencies: list[float] = []
        for client in clients:
            out, _ = await client.communicate()
            line = next((x for x in out.decode().splitlines() if x.startswith(RESULT_PREFIX)), None)
            if line is None:
                raise BenchError("a subscriber process ended without a result")
            latencies += orjson.loads(line[len(RESULT_PREFIX) :])["latencies"]
        rss = server.peak_rss
    return {
        "subscribers": options.subscribers,
        "events": options.events,
        "deliveries": len(latencies),
        "connect_seconds": connect_seconds,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000,
        "server_peak_rss": rss,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fanout", description=__doc__)
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between events")
    parser.add_argument("--clients", type=int, default=2, help="subscriber processes")
    parser.add_argument("--serve-subscribers", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    _raise_fd_limit()
    if options.serve_subscribers:
        url, count, events = options.serve_subscribers
        asyncio.run(_subscribers(url, int(count), int(events)))
        return
    with tempfile.TemporaryDirectory(prefix="taskserver-fanout-") as tmp:
        result = asyncio.run(_orchestrate(options, Path(tmp)))
    rss = result["server_peak_rss"]
    print(
        f"{result['subscribers']:,} SSE subscribers on one process: event delivery "
        f"p99 {result['p99_ms']:.1f} ms (p50 {result['p50_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms) over {result['deliveries']:,} deliveries; "
        f"connected in {result['connect_seconds']:.1f} s; "
        f"server peak RSS {f'{rss / 2**20:.0f} MiB' if rss else 'n/a'}; "
        f"{os.cpu_count()} CPUs shared by the server and {options.clients} client processes"
    )
    emit(result)


if __name__ == "__main__":
    main()
