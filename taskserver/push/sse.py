"""Server-Sent Events streams of task events: stored events first, then live ones.

A stream subscribes to the hub *before* it reads the store, so nothing committed
in between is missed; live events at or below the last replayed id are skipped,
so nothing is sent twice. When the hub drops a slow subscriber the stream ends
and the browser's ``EventSource`` reconnects with ``Last-Event-ID`` and replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..models import TERMINAL_EVENTS, Event
from .fanout import Subscription

#: Line breaks a ``data:`` field cannot hold (each line is a field of its own).
LINE_SEP = re.compile(r"\r\n|\r|\n")
#: Events read from the store per query while replaying.
REPLAY_PAGE = 500
#: Tells browsers how long to wait before reconnecting, in milliseconds.
RECONNECT_MS = 1000
#: A write to a client that does not read for this long drops the client.
SEND_TIMEOUT = 10.0
#: Sent with every stream: nginx (and proxies that follow it) then never buffers one,
#: whatever its own proxy_buffering says.
NO_PROXY_BUFFERING = {"X-Accel-Buffering": "no"}
#: Most live events framed into one write: a burst costs one write, not one each.
WRITE_BATCH = 256


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


async def stream_events(
    request: web.Request,
    subscription: Subscription[Event],
    replay: Callable[[int], Awaitable[list[Event]]],
    *,
    after: int,
    heartbeat: float,
    until_terminal: bool = False,
    tasks_only: bool = True,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """Stream events with ids above ``after``: ``replay(after_id)`` pages, then the hub.

    Closes ``subscription`` when done. With ``until_terminal`` the stream ends
    after the first terminal event (a per-task stream); ``tasks_only`` skips live
    updates that were published to the hub rather than made by a task.
    """
    opening = f": connected\nretry: {RECONNECT_MS}\n\n".encode()
    async with open_stream(
        request, subscription, heartbeat=heartbeat, opening=opening, headers=headers
    ) as response:
        last = after
        while True:
            page = await replay(last)
            frames = []
            ended = False
            for event in page:
                frames.append(frame(event))
                last = event.id
                if until_terminal and event.type in TERMINAL_EVENTS:
                    ended = True
                    break
            if frames:
                await _write(request, response, "".join(frames))  # a page, one write
            if ended:
                return response
            if len(page) < REPLAY_PAGE:
                break
        while (live := await subscription.get()) is not None:
            # What else is buffered goes in the same write (one syscall, one timeout).
            batch = [live]
            while len(batch) < WRITE_BATCH and (more := subscription.get_nowait()) is not None:
                batch.append(more)
            frames = []
            ended = False
            for event in batch:
                if event.id <= last or (tasks_only and event.task_id is None):
                    continue
                frames.append(frame(event))
                last = event.id
                if until_terminal and event.type in TERMINAL_EVENTS:
                    ended = True
                    break
            if frames:
                await _write(request, response, "".join(frames))
            if ended:
                break
    return response


def frame(event: Event, sep: str = EventSourceResponse.DEFAULT_SEPARATOR) -> str:
    """One event in the SSE wire format, as ``EventSourceResponse.send`` frames it."""
    parts = [f"id: {event.sse_id}{sep}"]
    if event.type is not None:
        parts.append(f"event: {event.type}{sep}")
    parts.extend(f"data: {line}{sep}" for line in LINE_SEP.split(event.json))
    if event.retry is not None:
        parts.append(f"retry: {event.retry}{sep}")
    parts.append(sep)
    return "".join(parts)


async def _write(request: web.Request, response: EventSourceResponse, text: str) -> None:
    """Write framed events, as ``send`` does: a stalled client is cut after SEND_TIMEOUT
    (aborted: a graceful close would wait on the buffer it never drains)."""
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await response.write(text.encode())
    except ConnectionResetError:
        response.stop_streaming()
        raise
    except TimeoutError:
        response.stop_streaming()
        if request.transport is not None:
            request.transport.abort()
        raise
