"""Over TLS the connection bound and the head timeout hold from accept, before any
handshake (taskserver/web/tls.py ``TlsGate``): a real ``taskserver run`` with a
self-signed certificate, real loopback sockets that never start a handshake."""

from __future__ import annotations

import asyncio
import resource
import selectors
import socket
import ssl
import time
from pathlib import Path

import aiohttp
import pytest

from .test_access_cli import self_signed
from .test_netguard import (
    SLACK,
    RunServer,
    address,
    close_all,
    healthz_on,
    open_idle,
    read_until_eof,
    start,
)

# The run_server fixture leaves its log file open (see tests/test_browser.py).
pytestmark = pytest.mark.filterwarnings(r"ignore:unclosed file .*server-\d+\.log:ResourceWarning")


def connect_and_watch(
    host: str, port: int, count: int, bound: float
) -> tuple[list[socket.socket], list[tuple[bytes, float]]]:
    """``count`` connections that send nothing, opened one after another, and for each
    what the server sent until it closed and when: seconds since the first connect.

    Blocking sockets in a thread, every close timed from the first connect: timed by
    reads started on the test's loop after other reads, a slow machine once saw held
    connections "cut" before the head timeout. The caller closes the sockets (on a
    failure here they are closed at once).
    """
    began = time.monotonic()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection((host, port), timeout=SLACK))
        seen: list[tuple[bytes, float] | None] = [None] * count
        with selectors.DefaultSelector() as watch:
            for index, sock in enumerate(socks):
                watch.register(sock, selectors.EVENT_READ, index)
            while watch.get_map() and (left := began + bound - time.monotonic()) > 0:
                for key, _ in watch.select(left):
                    try:
                        data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                    except ConnectionResetError:
                        data = b""
                    seen[key.data] = (data, time.monotonic() - began)
                    watch.unregister(key.fileobj)
        assert all(s is not None for s in seen), f"{seen.count(None)} never closed in {bound} s"
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, [s for s in seen if s is not None]


async def test_tls_connections_that_never_handshake_are_counted_and_cut_at_the_head_timeout(
    run_server: RunServer, tmp_path: Path
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip(f"the hard open-files limit ({hard}) is too low")
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client side needs them
    cert, key = self_signed(tmp_path)
    server = await start(
        run_server,
        *("--tls-cert", str(cert), "--tls-key", str(key)),
        *("--request-head-timeout", "3", "--max-connections", "144"),
    )
    host, port = address(server)
    trust = ssl.create_default_context(cafile=str(cert))
    # The first 144 fill the bound; the 356 after them are past it.
    socks, seen = await asyncio.to_thread(connect_and_watch, host, port, 500, 3 + SLACK)
    try:
        assert all(data == b"" for data, _ in seen)  # nothing can be said before a handshake
        refused_by = max(seconds for _, seconds in seen[144:])
        cut = sorted(seconds for _, seconds in seen[:144])
        print(
            f"356 refused by {refused_by:.2f} s; 144 cut {cut[0]:.2f} .. {cut[-1]:.2f} s"
            " after the first connect"
        )
        assert refused_by < 2.4  # at once, not at the head timeout
        assert cut[0] >= 2.4  # held to the head timeout, not longer
        # With all 500 still open on this side, an HTTPS client is served.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=trust, force_close=True),
            timeout=aiohttp.ClientTimeout(total=SLACK),
        ) as session:
            assert await healthz_on(session, server.url, 20) == 20
    finally:
        for sock in socks:
            sock.close()
    log = server.log.read_text()
    assert "connection limit 144 reached" in log
    assert "Traceback" not in log


async def test_a_tls_client_that_handshakes_and_sends_nothing_is_cut_at_the_head_timeout(
    run_server: RunServer, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    server = await start(
        run_server,
        *("--tls-cert", str(cert), "--tls-key", str(key), "--request-head-timeout", "1"),
    )
    host, port = address(server)
    trust = ssl.create_default_context(cafile=str(cert))
    began = time.monotonic()  # before the server accepts, so before its timer starts
    reader, writer = await asyncio.open_connection(host, port, ssl=trust)
    data, took = await read_until_eof(reader, SLACK, since=began)
    await close_all([(reader, writer)])
    assert data == b""
    assert 0.8 <= took < 1 + SLACK  # from accept: the handshake's time counts
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
        assert await healthz_on(session, server.url, 3) == 3


async def test_the_tls_gate_on_asyncios_own_loop(tmp_path: Path) -> None:
    # taskserver run uses uvloop and its TLS protocol; an embedding app may run asyncio's.
    from aiohttp import web

    from taskserver import load_settings
    from taskserver.web import netguard
    from taskserver.web.tls import server_context

    assert "uvloop" not in type(asyncio.get_running_loop()).__module__
    cert, key = self_signed(tmp_path)
    context = server_context(str(cert), str(key))
    settings = load_settings(
        env={"TASKSERVER_MAX_CONNECTIONS": "2", "TASKSERVER_REQUEST_HEAD_TIMEOUT": "2"}
    )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = netguard.runner(app, settings, context)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        idle = await open_idle("127.0.0.1", port, 3)  # the third is past the bound
        data, took = await read_until_eof(idle[2][0], SLACK)
        assert data == b""
        assert took < 1.0  # refused at once, not held to the head timeout (2 s)
        for reader, _ in idle[:2]:
            data, took = await read_until_eof(reader, SLACK)
            assert data == b""
        assert runner.guard.open == 0
        trust = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as session:
            assert await healthz_on(session, f"https://127.0.0.1:{port}", 3) == 3
        await close_all(idle)
    finally:
        await runner.cleanup()
