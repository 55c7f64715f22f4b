"""The fan-out: coalesced rounds, groups sharing their frames, slow subscribers dropped.

Real servers on loopback, real SSE readers, and a real socket that stops reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from taskserver import TaskContext
from taskserver.push.fanout import Fanout

from .conftest import ClientFactory, SSEEvent, sse, wait_for
from .test_sse import Client, ids_of, post, read_until_finished, server_of, stored_events

#: A result this large makes each ``finished`` frame ~20 KB: TASKS of them fill any socket.
BIG = 20_000
TASKS = 600


async def big_result(ctx: TaskContext) -> Any:
    return "x" * BIG


@contextlib.asynccontextmanager
async def stalled(client: Client, path: str) -> AsyncIterator[socket.socket]:
    """A stream whose client reads the response head, then never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_connect(sock, (client.host, client.port))
        request = f"GET {path} HTTP/1.1\r\nHost: {client.host}:{client.port}\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 1)
            assert chunk, "closed before the response head"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        yield sock
    finally:
        sock.close()


def parse_sse(body: bytes) -> list[SSEEvent]:
    """The events of an SSE body (one-line fields)."""
    events = []
    for block in body.decode().replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "data" in fields:
            events.append(
                SSEEvent(id=fields.get("id"), event=fields.get("event"), data=fields["data"])
            )
    return events


async def test_subscriber_that_never_reads_is_dropped_and_the_others_keep_receiving(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task=big_result, task_workers=2, subscriber_queue=50)
    server = server_of(client)
    async with client.get("/events") as response, stalled(client, "/events"):
        body = bytearray()

        async def read() -> None:  # raw chunks: this reader keeps up with the server
            while chunk := await response.content.readany():
                body.extend(chunk)

        reader = asyncio.create_task(read())
        await wait_for(lambda: server.stats()["subscribers"] == 2, message="both subscribed")
        ids = [await server.task(n) for n in range(TASKS)]  # one by one: many rounds
        await wait_for(lambda: server.fanout.dropped == 1, message="the stalled one dropped")
        await wait_for(
            lambda: body.count(b"event: finished") == TASKS, message="the reader got all"
        )
        assert server.stats()["subscribers"] == 1  # the reader is still there
        reader.cancel()
    events = parse_sse(bytes(body))
    stored = [(i, d) for i, _, _, d in stored_events(server.settings.db)]
    assert [(int(e.id or 0), e.data) for e in events] == stored
    assert {orjson.loads(e.data)["task_id"] for e in events if e.event == "finished"} == set(ids)


async def test_slow_subscriber_is_dropped_and_catches_up_by_replay(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task=big_result, task_workers=2, subscriber_queue=10)
    server = server_of(client)
    async with stalled(client, "/events?lastEventID=0") as sock:
        await wait_for(lambda: server.stats()["subscribers"] == 1, message="subscribed")
        ids = [await server.task(n) for n in range(TASKS)]  # one by one: many rounds
        await wait_for(lambda: server.fanout.dropped == 1, message="dropped")
        loop = asyncio.get_running_loop()
        received = 0
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(sock, 1 << 16):  # until the cut
                    received += len(chunk)
        assert received < TASKS * BIG  # it never got the rest
    # Its connection was cut (a graceful end would wait on a client that does not
    # read); the browser reconnects from its last id (it parsed nothing): all, once.
    async with client.get("/events", headers={"Last-Event-ID": "0"}) as response:
        events = await read_until_finished(sse(response), set(ids))
    stored = [(i, d) for i, _, _, d in stored_events(server.settings.db)]
    assert [(int(e.id or 0), e.data) for e in events] == stored[: len(events)]


async def test_a_burst_larger_than_the_buffer_does_not_drop_a_reader(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task_workers=0, subscriber_queue=2)
    server = server_of(client)
    async with client.get("/events") as response:
        reader = sse(response)
        await wait_for(lambda: server.stats()["subscribers"] == 1, message="subscribed")
        burst = await asyncio.gather(*(server.task(n) for n in range(50)))  # one round
        events = await reader.collect(50)
    assert [orjson.loads(e.data)["task_id"] for e in events] == sorted(burst)
    assert server.fanout.dropped == 0


async def test_coalesced_frames_arrive_complete_and_in_order(make_client: ClientFactory) -> None:
    key = "!ChangeThisMercureHubJWTSecretKey!"
    client = await make_client(mercure_publisher_jwt_key=key, mercure_anonymous=True)
    server = server_of(client)
    template = quote(server.topic(0).removesuffix("0") + "{id}", safe="")
    async with contextlib.AsyncExitStack() as stack:
        streams = [await stack.enter_async_context(client.get("/events")) for _ in range(3)]
        streams += [
            await stack.enter_async_context(client.get(f"/.well-known/mercure?topic={template}"))
            for _ in range(2)
        ]
        await wait_for(lambda: server.stats()["subscribers"] == 5, message="subscribed")
        rounds = server.fanout.rounds
        ids = list(await asyncio.gather(*(server.task({"n": n}) for n in range(300))))
        got: list[list[SSEEvent]] = []
        for response in streams[:3]:
            got.append(await read_until_finished(sse(response), set(ids)))
        for response in streams[3:]:  # Mercure: no `event:` name; the type is in the payload
            reader = sse(response)
            events: list[SSEEvent] = []
            while sum(orjson.loads(e.data)["type"] == "finished" for e in events) < len(ids):
                event = await reader.next()
                assert event is not None
                events.append(event)
            got.append(events)
    stored = [(i, d) for i, _, _, d in stored_events(server.settings.db)]
    assert len(stored) == 3 * len(ids)  # queued, started, finished
    for events in got:
        assert [(int(e.id or 0), e.data) for e in events] == stored
    # 900 events to 5 streams came in far fewer rounds than events (each a write per stream).
    assert server.fanout.rounds - rounds < len(stored) // 3


async def test_live_events_after_a_replay_repeat_nothing_and_miss_nothing(
    make_client: ClientFactory,
) -> None:
    client = await make_client(task_workers=2)
    server = server_of(client)
    first = await post(client, "first")
    await wait_for(lambda: len(stored_events(server.settings.db)) >= 3, message="first ran")
    cursor = stored_events(server.settings.db)[0][0]
    stop = asyncio.Event()

    async def produce() -> list[int]:
        made: list[int] = []
        while not stop.is_set():  # commits keep coming while the stream replays
            made += await asyncio.gather(*(server.task(n) for n in range(20)))
        return made

    producer = asyncio.create_task(produce())
    await wait_for(lambda: len(stored_events(server.settings.db)) > 200, message="backlog")
    async with client.get("/events", headers={"Last-Event-ID": str(cursor)}) as response:
        reader = sse(response)
        await wait_for(lambda: server.stats()["subscribers"] == 1, message="subscribed")
        stop.set()
        made = await producer
        events = await read_until_finished(reader, {first, *made})
    got = ids_of(events)
    stored = [i for i, task_id, _, _ in stored_events(server.settings.db, cursor) if task_id]
    assert got == stored[: len(got)]


async def test_a_group_encodes_each_item_once_for_all_its_subscribers() -> None:
    encoded: list[int] = []

    def encode(item: int) -> bytes:
        encoded.append(item)
        return b"%d\n" % item

    hub: Fanout[int] = Fanout(max_subscribers=200, buffer_size=100)
    subs = [hub.subscribe(("t",), key="same", encode=encode) for _ in range(100)]
    odd = hub.subscribe(("t",), key="odd", accept=lambda i: i % 2 == 1, encode=encode)
    for item in range(20):
        hub.publish(("t",), item)
    for sub in subs:
        assert [await sub.get() for _ in range(20)] == list(range(20))
    assert [await odd.get() for _ in range(10)] == list(range(1, 20, 2))
    assert sorted(encoded) == list(range(20))  # once per item, not per subscriber
    assert hub.rounds == 1


async def test_an_http_1_0_client_gets_the_frames_unchunked(make_client: ClientFactory) -> None:
    client = await make_client(task_workers=0)
    server = server_of(client)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(f"GET /events HTTP/1.0\r\nHost: {client.host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), head
        assert b"chunked" not in head.lower(), head
        await wait_for(lambda: server.stats()["subscribers"] == 1, message="subscribed")
        ids = list(await asyncio.gather(*(server.task(n) for n in range(5))))
        body = b""
        async with asyncio.timeout(10):
            while body.count(b"event: queued") < len(ids):
                body += await reader.read(1 << 16)
    finally:
        writer.close()
    events = parse_sse(body)
    assert [orjson.loads(e.data)["task_id"] for e in events] == ids
