"""The floor under the fan-out latency: ``python -m benchmarks.sendfloor COUNT EVENTS INTERVAL``.

A bare stand-in for the hub, so that the 10,000-subscriber delivery figures of
section ``fanout`` have a baseline measured in the same run, with the same
reader: no HTTP parsing, no store, no hub, no event loop. It listens on
127.0.0.1, answers each of ``COUNT`` connections' request head with a 200
``text/event-stream`` head; once one more connection (the go-ahead, opened by
the orchestrator when the reader is ready) has sent its head, it sends
``EVENTS`` frames ``INTERVAL`` seconds apart, each ``data:`` its
``time.monotonic()`` when the send loop starts, with one plain blocking
``socket.send`` per connection in one thread: what the kernel charges one
sender for that many loopback writes. The hub's figure adds the publish
request, its durable commit and the fan-out's own Python.

It prints ``listening on http://…`` (``bench.serve`` reads it) and, after the
last frame, ``sent EVENTS``; then it waits to be stopped.
"""

from __future__ import annotations

import argparse
import socket
import time

from .subscribers import raise_fd_limit

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n:\n\n"
#: Printed once every frame is sent: the reader may be told to finish.
SENT = "sent"


def _accept(listener: socket.socket, count: int) -> list[socket.socket]:
    """``count`` connections, each answered once its request head has arrived."""
    streams: list[socket.socket] = []
    while len(streams) < count:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                break
            request += chunk
        if b"\r\n\r\n" in request:
            conn.sendall(HEAD)
            streams.append(conn)
        else:
            conn.close()
    return streams


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sendfloor", description=__doc__)
    parser.add_argument("count", type=int)
    parser.add_argument("events", type=int)
    parser.add_argument("interval", type=float)
    args = parser.parse_args()
    raise_fd_limit()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    streams = _accept(listener, args.count)
    for go in _accept(listener, 1):
        go.close()
    for _ in range(args.events):
        frame = f"data: {time.monotonic()!r}\n\n".encode()
        for conn in streams:
            conn.sendall(frame)
        time.sleep(args.interval)
    print(f"{SENT} {args.events}", flush=True)
    while True:  # the streams stay open until the reader has read them; bench.serve stops us
        time.sleep(60)


if __name__ == "__main__":
    main()
