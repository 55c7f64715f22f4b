"""A burst of connects is queued by the kernel, not dropped (taskserver/cli.py
``LISTEN_BACKLOG``): a real ``taskserver run``, real loopback sockets opened one
after another faster than one process accepts them."""

from __future__ import annotations

import asyncio
import resource
import socket
import time

import aiohttp
import pytest

from .test_netguard import SLACK, RunServer, address, healthz_on, start

BURST = 600  # past aiohttp's default backlog of 128, within taskserver's


def burst(host: str, port: int, count: int) -> tuple[list[socket.socket], float]:
    """``count`` blocking connects in a row, and the slowest one's seconds."""
    socks: list[socket.socket] = []
    slowest = 0.0
    try:
        for _ in range(count):
            began = time.monotonic()
            socks.append(socket.create_connection((host, port), timeout=SLACK))
            slowest = max(slowest, time.monotonic() - began)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, slowest


async def test_a_burst_of_connects_past_aiohttps_default_backlog_waits_no_retransmit(
    run_server: RunServer,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * BURST:
        pytest.skip(f"the hard open-files limit ({hard}) is too low")
    if soft < 2 * BURST:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client side needs them
    server = await start(run_server)
    host, port = address(server)
    socks, slowest = await asyncio.to_thread(burst, host, port, BURST)
    try:
        # A SYN dropped from a full accept queue is sent again one second later.
        assert slowest < 0.9, f"a connect took {slowest:.2f} s: its SYN was dropped"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SLACK)) as session:
            assert await healthz_on(session, server.url, 3) == 3
    finally:
        for sock in socks:
            sock.close()
