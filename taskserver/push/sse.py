"""Server-Sent Events streams of task events: stored events first, then live ones.

A stream subscribes to the hub *before* it reads the store, so nothing committed
in between is missed; live events at or below the last replayed id are skipped,
so nothing is sent twice. Replayed events go out a page per write; live ones are
written by the hub's flush through a ``TransportSink``, one write per round. When
the hub drops a slow subscriber its connection is cut and the browser's
``EventSource`` reconnects with ``Last-Event-ID`` and replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..models import TERMINAL_EVENTS, Event
from .fanout import Fanout
from .subscription import Batch, Subscription

_LINE_BREAK = re.compile(r"\r\n|\r|\n")

#: Events read from the store per query while replaying.
REPLAY_PAGE = 500
#: Tells browsers how long to wait before reconnecting, in milliseconds.
RECONNECT_MS = 1000
#: A write to a client that does not read for this long drops the client.
SEND_TIMEOUT = 10.0
#: Sent with every stream: nginx (and proxies that follow it) then never buffers one,
#: whatever its own proxy_buffering says.
NO_PROXY_BUFFERING = {"X-Accel-Buffering": "no"}
#: A connection holding this many unsent bytes takes no more until it drains (aiohttp's own
#: drain threshold); meanwhile its frames wait in the hub, which drops it past its bound.
HIGH_WATER = 64 * 1024


@contextlib.asynccontextmanager
async def open_stream(
    request: web.Request,
    subscription: Subscription[Event],
    *,
    heartbeat: float,
    opening: bytes,
    headers: dict[str, str] | None = None,
    cache_control: str | None = None,
) -> AsyncIterator[EventSourceResponse]:
    """An SSE response, prepared and flushed, whose ``subscription`` ends with the client.

    ``opening`` is written at once (a comment): browsers fire ``onopen`` only once
    the headers are flushed; ``X-Accel-Buffering: no`` goes with them (nginx never
    buffers a stream). When the client goes (its heartbeat write fails) the
    subscription is closed, so a body waiting on it wakes up. A client that goes
    away or stops reading ends the body quietly; on the way out the subscription
    is closed and the heartbeats stop.
    """
    headers = {**NO_PROXY_BUFFERING, **headers} if headers else NO_PROXY_BUFFERING
    response = EventSourceResponse(
        headers=headers, ping_interval=heartbeat, send_timeout=SEND_TIMEOUT
    )
    if cache_control is not None:
        response.headers["Cache-Control"] = cache_control  # replaces the library's
    watcher: asyncio.Task[None] | None = None
    try:
        await response.prepare(request)
        await response.write(opening)
        watcher = asyncio.create_task(response.wait())
        watcher.add_done_callback(lambda _: subscription.close())
        yield response
    except (ConnectionResetError, TimeoutError):
        pass  # the client went away or stopped reading
    finally:
        subscription.close()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if response.prepared:
            response.stop_streaming()


class TransportSink:
    """Writes a streaming subscriber's batches straight to its connection, one write each.

    The response's headers and first chunk are out (``open_stream``) before a sink
    is made, so what follows is body: one HTTP/1.1 chunk per batch when the
    response is chunked, the bytes as they are otherwise (HTTP/1.0). A write is a
    whole chunk, so it never splits one the response writes (heartbeats).
    """

    __slots__ = ("_chunked", "_transport")

    def __init__(self, request: web.BaseRequest) -> None:
        self._transport = request.transport
        self._chunked = bool(getattr(request.writer, "chunked", False))

    def write(self, batch: Batch[Any]) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the subscriber's connection is closed")
        if transport.get_write_buffer_size() > HIGH_WATER:
            return False
        transport.write(batch.chunked if self._chunked else batch.data)
        return True

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def sse_frame(event: Event) -> bytes:
    """``event`` as an SSE message, as ``EventSourceResponse.send`` frames it."""
    head = f"id: {event.sse_id}\r\n"
    if event.type is not None:
        head += f"event: {event.type}\r\n"
    text = event.json
    if "\n" in text or "\r" in text:
        data = "".join(f"data: {line}\r\n" for line in _LINE_BREAK.split(text))
    else:
        data = f"data: {text}\r\n"
    retry = f"retry: {event.retry}\r\n" if event.retry is not None else ""
    return f"{head}{data}{retry}\r\n".encode()


def _is_task_event(event: Event) -> bool:
    return event.task_id is not None


def subscribe_events(fanout: Fanout[Event], topic: str | None = None) -> Subscription[Event]:
    """A stream's subscription to one task's topic, or to every task event (``None``).

    Streams of the same topic share one group: each event is matched and framed
    once for all of them. Raises ``ServerBusy`` as ``Fanout.subscribe`` does.
    """
    if topic is None:
        return fanout.subscribe(
            match_all=True, key=("sse", None), accept=_is_task_event, encode=sse_frame
        )
    return fanout.subscribe((topic,), key=("sse", topic), accept=_is_task_event, encode=sse_frame)


async def stream_events(
    request: web.Request,
    subscription: Subscription[Event],
    replay: Callable[[int], Awaitable[list[Event]]],
    *,
    after: int,
    heartbeat: float,
    until_terminal: bool = False,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """Stream events with ids above ``after``: ``replay(after_id)`` pages, then the hub.

    ``subscription`` comes from ``subscribe_events`` (it frames the events) and is
    closed when done. With ``until_terminal`` the stream ends after the first
    terminal event (a per-task stream).
    """
    opening = f": connected\nretry: {RECONNECT_MS}\n\n".encode()
    async with open_stream(
        request, subscription, heartbeat=heartbeat, opening=opening, headers=headers
    ) as response:
        last = after
        while not subscription.closed:
            page = await replay(last)
            frames: list[bytes] = []
            ended = False
            for event in page:
                frames.append(sse_frame(event))
                last = event.id
                if until_terminal and event.type in TERMINAL_EVENTS:
                    ended = True
                    break
            if frames:
                await _write(request, response, b"".join(frames))
            if ended:
                return response
            if len(page) < REPLAY_PAGE:
                break
        seen = last
        subscription.stream(
            TransportSink(request),
            skip=lambda event: event.id <= seen,
            until=_is_terminal if until_terminal else None,
        )
        await subscription.closed_wait()
    return response


def _is_terminal(event: Event) -> bool:
    return event.type in TERMINAL_EVENTS


async def _write(request: web.Request, response: EventSourceResponse, data: bytes) -> None:
    """Write replayed frames; a client that stops reading is cut off after ``SEND_TIMEOUT``."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await response.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise
