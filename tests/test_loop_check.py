"""The suite's loop check (``SlowCallbacks`` in tests/conftest.py) counts every step
that holds the event loop but the test's own: an aiohttp handler that blocks is
reported; the test's own helper task is not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from .conftest import SlowCallbacks

HELD = 0.05


@pytest.fixture
async def reports() -> AsyncIterator[list[str]]:
    """What a check at ``HELD`` seconds reports while the test runs."""
    loop = asyncio.get_running_loop()
    handler = SlowCallbacks(least=HELD)
    logger = logging.getLogger("asyncio")
    before = loop.slow_callback_duration
    loop.slow_callback_duration = HELD
    logger.addHandler(handler)
    try:
        yield handler.reports
    finally:
        logger.removeHandler(handler)
        loop.slow_callback_duration = before


async def helper() -> None:
    """A test's helper coroutine (a module-level one, like tests/test_recovery.py's)."""
    time.sleep(2 * HELD)  # noqa: ASYNC251 (blocking the loop is the point)


async def test_a_blocking_handler_is_reported_and_the_tests_own_helper_is_not(
    reports: list[str],
) -> None:
    async def blocking(request: web.Request) -> web.Response:
        time.sleep(2 * HELD)  # noqa: ASYNC251 (blocking the loop is the point)
        return web.Response(text="ok")

    # Asserted by name: a slow machine may hold the loop HELD for any step, the check's
    # verdict on these two is the point.
    await asyncio.create_task(helper())
    assert not any("helper" in r for r in reports), reports
    app = web.Application()
    app.router.add_get("/", blocking)
    async with TestClient(TestServer(app)) as client, client.get("/") as response:
        assert response.status == 200
    assert not any("helper" in r for r in reports), reports
    assert sum("aiohttp/web_protocol.py" in r for r in reports) == 1, reports


def test_a_step_of_a_client_stream_is_the_tests_own() -> None:
    # What asyncio reported on a busy CI machine while a test opened 500 connections.
    streams = Path(asyncio.__file__).parent / "streams.py"
    message = (
        f"Executing <Task pending name='Task-13651' coro=<open_connection() running at"
        f" {streams}:48> wait_for=<Future pending> cb=[gather.<locals>._done_callback()]>"
        " took 0.526 seconds"
    )
    assert not SlowCallbacks.counts(message)
    handler = message.replace(str(streams), "/venv/site-packages/aiohttp/web_protocol.py")
    assert SlowCallbacks.counts(handler)
