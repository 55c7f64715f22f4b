"""Hostile clients cannot take ``taskserver run`` down (taskserver/netguard.py).

Every test starts a real ``taskserver run`` subprocess and talks to it over real
loopback sockets: idle and half-open connections, heads and bodies that never
complete, idle keep-alive connections, and a normal client that must keep working.
Timeouts are set small through the settings; each wait is for a condition (a
response, or EOF) with a bound, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from taskserver import ConfigError, load_settings
from taskserver.web.netguard import FD_RESERVE, connection_limit

from .conftest import ServerProcess, sse

RunServer = Callable[..., ServerProcess]

#: A generous bound for "promptly" on a loaded 2-core machine.
SLACK = 5.0


async def start(run_server: RunServer, *args: str) -> ServerProcess:
    return await asyncio.to_thread(run_server, "--task-workers", "1", *args)


def address(server: ServerProcess) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def connect(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One plain connection to ``server``."""
    return await asyncio.open_connection(*address(server))


@contextlib.contextmanager
def soft_open_files(limit: int) -> Iterator[None]:
    """Lower this process's soft RLIMIT_NOFILE while a child is started (it inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def child_nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) 'Max open files' of process ``pid``, from /proc."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


async def read_until_eof(
    reader: asyncio.StreamReader, bound: float, since: float | None = None
) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took from ``since``
    (``time.monotonic()``, default now). A ``since`` taken before the server's timer can
    have started makes the time a lower bound a slow client cannot shorten."""
    began = time.monotonic() if since is None else since
    async with asyncio.timeout(bound):
        data = await reader.read()
    return data, time.monotonic() - began


async def healthz_on(session: aiohttp.ClientSession, url: str, count: int) -> int:
    """How many of ``count`` sequential ``GET /healthz`` answered 200."""
    ok = 0
    for _ in range(count):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(f"{url}/healthz") as response:
                ok += response.status == 200
    return ok


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(host: str, port: int, count: int) -> list[Conn]:
    """``count`` connections that send nothing, opened a batch at a time."""
    conns: list[Conn] = []
    for first in range(0, count, 100):
        conns.extend(
            await asyncio.gather(
                *(asyncio.open_connection(host, port) for _ in range(min(100, count - first)))
            )
        )
    return conns


async def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def status_line(data: bytes) -> str:
    return data.split(b"\r\n", 1)[0].decode()


def body_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[1]


def header(data: bytes, name: str) -> str | None:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    match = re.search(rf"^{name}: *(.*?)\r?$", head, re.IGNORECASE | re.MULTILINE)
    return match.group(1) if match else None


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole response off a kept-alive connection: its head (returned), then its body."""
    head = await reader.readuntil(b"\r\n\r\n")
    await reader.readexactly(int(header(head, "Content-Length") or 0))
    return head


def post_task(body: bytes) -> bytes:
    """A whole ``POST /tasks`` request, head and ``body``."""
    return (
        b"POST /tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


# --- (a) idle connections and the connection bound -------------------------------------


async def test_connections_past_max_connections_get_503_and_a_client_keeps_working(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--max-connections", "100", "--request-head-timeout", "60")
    host, port = address(server)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        assert await healthz_on(session, server.url, 1) == 1  # holds one of the 100
        idle = await open_idle(host, port, 300)
        try:
            answers = await asyncio.gather(
                *(read_until_eof(reader, SLACK) for reader, _ in idle[-150:])
            )
            # The last 150 are past the bound: refused at once, cheaply, with a reason.
            for data, _ in answers:
                assert status_line(data) == "HTTP/1.1 503 Service Unavailable", data
                assert header(data, "Retry-After") == "1"
                assert orjson.loads(body_of(data))["status"] == 503
            assert await healthz_on(session, server.url, 50) == 50
        finally:
            await close_all(idle)
    # Once the idle ones are gone, new connections are accepted again.
    async with aiohttp.ClientSession() as fresh:

        async def accepted() -> bool:
            return await healthz_on(fresh, server.url, 1) == 1

        deadline = time.monotonic() + SLACK
        while not await accepted():
            assert time.monotonic() < deadline, "the bound was not released"
            await asyncio.sleep(0.05)
    log = server.log.read_text()
    assert "connection limit 100 reached" in log
    assert "Traceback" not in log


async def test_a_flood_of_half_open_connections_is_released_by_the_head_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--max-connections", "100", "--request-head-timeout", "1")
    host, port = address(server)
    flood = await open_idle(host, port, 100)  # fills the bound
    for _, writer in flood:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never finishes
    reader, writer = await asyncio.open_connection(host, port)
    refused, _ = await read_until_eof(reader, SLACK)
    writer.close()
    assert status_line(refused) == "HTTP/1.1 503 Service Unavailable"
    # Without any help from the clients, every one of them is answered and closed ...
    answers = await asyncio.gather(*(read_until_eof(r, 1 + SLACK) for r, _ in flood))
    assert {status_line(data) for data, _ in answers} == {"HTTP/1.1 408 Request Timeout"}
    await close_all(flood)
    # ... so the server has room again.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/healthz") as response,
    ):
        assert response.status == 200


async def test_1100_idle_connections_under_a_1024_soft_limit_leave_healthz_working(
    run_server: RunServer,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip(f"the hard open-files limit ({hard}) is too low for 1,100 connections")
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the client side needs them
    with soft_open_files(1024):  # the common default the child starts with
        server = await start(run_server, "--request-head-timeout", "120")
    host, port = address(server)
    idle = await open_idle(host, port, 1100)
    for _, writer in idle[::2]:  # half of them start a head and never finish it
        writer.write(b"POST /tasks HTTP/1.1\r\nHost: localhost\r\n")
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=SLACK),
        ) as session:
            assert await healthz_on(session, server.url, 50) == 50  # each on a new connection
        # and every idle connection is still held, none dropped for lack of descriptors
        assert not any(reader.at_eof() for reader, _ in idle)
    finally:
        await close_all(idle)


# --- (b) a head that never completes ----------------------------------------------------


async def test_a_head_that_never_completes_gets_408_after_the_head_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-head-timeout", "0.5")
    began = time.monotonic()  # before the server accepts, so before its timer starts
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: never complete
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert status_line(data) == "HTTP/1.1 408 Request Timeout", data
    assert header(data, "Connection") == "close"
    assert orjson.loads(body_of(data))["status"] == 408
    assert 0.4 <= took < SLACK


async def test_a_head_trickled_a_byte_at_a_time_is_cut_at_the_head_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-head-timeout", "0.5")
    began = time.monotonic()  # before the server accepts, so before its timer starts
    reader, writer = await connect(server)
    closed = asyncio.ensure_future(reader.read())
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
        if closed.done():
            break
        writer.write(bytes([byte]))
        await asyncio.wait([closed], timeout=0.02)  # each byte well inside any timeout
    async with asyncio.timeout(SLACK):
        data = await closed
    took = time.monotonic() - began
    writer.close()
    assert status_line(data) == "HTTP/1.1 408 Request Timeout", data
    assert 0.4 <= took < 0.5 + SLACK


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-head-timeout", "0.5")
    began = time.monotonic()  # before the server accepts, so before its timer starts
    reader, writer = await connect(server)
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert data == b""  # nothing was asked, so nothing is answered
    assert 0.4 <= took < SLACK


async def test_a_second_head_on_a_kept_alive_connection_has_its_own_head_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-head-timeout", "0.5", "--keepalive-timeout", "60")
    reader, writer = await connect(server)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(SLACK):
        first = await read_answer(reader)
    assert status_line(first) == "HTTP/1.1 200 OK"
    began = time.monotonic()  # before the partial head, so before its timer starts
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert status_line(data) == "HTTP/1.1 408 Request Timeout", data
    assert 0.4 <= took < SLACK


async def test_a_partial_head_pipelined_behind_a_request_has_the_head_timeout(
    run_server: RunServer,
) -> None:
    # The partial head arrives while the first request is in flight (here in the same
    # read, as it also may under load): it too must be cut at the head timeout, not
    # held for the keep-alive timeout.
    server = await start(run_server, "--request-head-timeout", "0.5", "--keepalive-timeout", "60")
    reader, writer = await connect(server)
    try:
        began = time.monotonic()  # before the requests, so before any timer of theirs
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n"
        )
        data, took = await read_until_eof(reader, SLACK, since=began)
    finally:
        writer.close()
    assert status_line(data) == "HTTP/1.1 200 OK", data
    assert b"HTTP/1.1 408 Request Timeout" in data, data
    assert 0.4 <= took < SLACK


async def test_pipelined_requests_in_one_read_are_all_answered(run_server: RunServer) -> None:
    server = await start(run_server, "--request-head-timeout", "0.5")
    reader, writer = await connect(server)
    body = b'{"data": 1}'
    post = post_task(body)
    writer.write(post + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + post)
    statuses = []
    async with asyncio.timeout(SLACK):
        for _ in range(3):
            statuses.append(status_line(await read_answer(reader)))
    writer.close()
    assert statuses == ["HTTP/1.1 202 Accepted", "HTTP/1.1 200 OK", "HTTP/1.1 202 Accepted"]


# --- (c) a body shorter than its Content-Length ----------------------------------------


async def test_a_body_shorter_than_its_content_length_gets_408_and_the_server_serves_on(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--request-body-timeout", "0.5")
    reader, writer = await connect(server)
    began = time.monotonic()  # before the head, so before the body's timer starts
    writer.write(
        b"POST /tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    await writer.drain()
    writer.write(b'{"data": 1')  # 10 of the 100 bytes, in a packet of its own
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert status_line(data) == "HTTP/1.1 408 Request Timeout", data
    assert header(data, "Connection") == "close"
    problem = orjson.loads(body_of(data))
    assert problem["status"] == 408
    assert "body" in problem["detail"]
    assert 0.4 <= took < SLACK
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/tasks", json={"data": 1}) as response,
    ):
        assert response.status == 202
    log = server.log.read_text()
    assert "Traceback" not in log
    assert "Error handling request" not in log


async def test_a_whole_body_sent_after_its_head_is_not_cut(run_server: RunServer) -> None:
    server = await start(run_server, "--request-body-timeout", "2")
    reader, writer = await connect(server)
    body = b'{"data": {"n": 1}}'
    writer.write(
        b"POST /tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    await writer.drain()
    for byte in body:  # slowly, but within the body timeout
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.01)
    async with asyncio.timeout(SLACK):
        head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert status_line(head) == "HTTP/1.1 202 Accepted", head


# --- (d) idle keep-alive connections ----------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout(
    run_server: RunServer,
) -> None:
    server = await start(run_server, "--keepalive-timeout", "0.5")
    reader, writer = await connect(server)
    began = time.monotonic()  # before the request, so before the idle time after it
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(SLACK):
        head = await read_answer(reader)
    assert status_line(head) == "HTTP/1.1 200 OK"
    assert header(head, "Connection") != "close"
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert data == b""
    assert 0.4 <= took < SLACK


async def test_a_kept_alive_connection_idle_after_a_post_is_not_answered_408(
    run_server: RunServer,
) -> None:
    # Reading a body makes aiohttp feed the protocol an empty read (resume_reading):
    # that is no byte of a next head, so the idle connection lives to the keep-alive
    # timeout and is closed without an answer nobody asked for.
    server = await start(run_server, "--request-head-timeout", "0.5", "--keepalive-timeout", "2")
    reader, writer = await connect(server)
    began = time.monotonic()  # before the request, so before the idle time after it
    writer.write(post_task(b'{"data": {"n": 1}}'))
    async with asyncio.timeout(SLACK):
        head = await read_answer(reader)
    assert status_line(head) == "HTTP/1.1 202 Accepted", head
    data, took = await read_until_eof(reader, SLACK, since=began)
    writer.close()
    assert data == b"", data
    assert 1.9 <= took < SLACK


# --- event streams and long polls are long-lived by design ----------------------------


async def test_event_streams_and_long_polls_outlive_every_timeout(run_server: RunServer) -> None:
    server = await start(
        run_server,
        *("--request-head-timeout", "0.3", "--request-body-timeout", "0.3"),
        *("--keepalive-timeout", "0.3", "--heartbeat", "0.1"),
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/events") as response:
            sse(response)
            began = time.monotonic()
            async with asyncio.timeout(SLACK * 2):
                while time.monotonic() - began < 1.5:  # five times every timeout
                    assert await response.content.readline(), "the stream was cut"
        task = {"data": {"seconds": 1.0}}
        async with session.post(f"{server.url}/tasks", json=task) as posted:
            task_id = (await posted.json())["id"]
        async with session.get(f"{server.url}/tasks/{task_id}?wait=10") as polled:
            assert polled.status == 200
            assert (await polled.json())["state"] == "succeeded"


# --- (e) the open-files limit -----------------------------------------------------------


async def test_the_soft_open_files_limit_is_raised_to_the_hard_limit(
    run_server: RunServer,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024:
        pytest.skip(f"the hard open-files limit is {hard}: nothing to raise")
    with soft_open_files(1024):
        server = await start(run_server)
    soft_now, hard_now = child_nofile(server.proc.pid)
    assert soft_now == hard_now == hard
    log = server.log.read_text()
    expected = rf"INFO taskserver\S*: open files limit {hard} \(raised from 1024\); at most"
    assert re.search(expected, log), log


def test_max_connections_leaves_descriptors_for_the_server_itself() -> None:
    assert connection_limit(10_000, 1_048_576) == 10_000
    assert connection_limit(10_000, 1024) == 1024 - FD_RESERVE
    assert connection_limit(10_000, 100) == 1


@pytest.mark.parametrize(
    "name", ["request_head_timeout", "request_body_timeout", "keepalive_timeout"]
)
def test_a_timeout_must_be_positive(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(env={f"TASKSERVER_{name.upper()}": "0"})


def test_max_connections_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        load_settings(env={"TASKSERVER_MAX_CONNECTIONS": "0"})
