"""The examples in examples/ work as the README says."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from taskserver import Settings
from taskserver.web.app import create_app, load_setup

from .conftest import ROOT, sse


async def test_mail_app_enqueues_from_its_own_route(
    settings: Settings, aiohttp_client: Any
) -> None:
    app = await create_app(settings, load_setup("examples.mail:setup"))
    client = await aiohttp_client(app)
    response = await client.post("/send", json={"to": "a@example.com"})
    assert response.status == 202
    body = await response.json()
    assert body["topic"].endswith(f"/tasks/{body['id']}")
    task = await (await client.get(f"/tasks/{body['id']}?wait=10")).json()
    assert task["state"] == "succeeded"
    assert task["queue"] == "mail"
    assert task["result"] == {"sent": "a@example.com", "attempt": 1}

    bad = await (await client.post("/send", json={"to": "nobody"})).json()
    failed = await (await client.get(f"/tasks/{bad['id']}?wait=10")).json()
    assert failed["state"] == "failed"
    assert failed["attempts"] == 1  # PermanentError: no retry despite max_attempts=5
    assert "not an address" in failed["error"]


async def test_embedded_app_streams_its_task(settings: Settings, aiohttp_client: Any) -> None:
    from examples.embedded import make_app

    client = await aiohttp_client(make_app(settings))
    body = await (await client.post("/images/cat.png")).json()
    async with client.get(body["events"]) as stream:
        events = await sse(stream).collect()
    assert [e.event for e in events] == ["queued", "started", "progress", "finished"]


async def test_mail_app_refuses_a_body_that_is_not_an_object(
    settings: Settings, aiohttp_client: Any
) -> None:
    app = await create_app(settings, load_setup("examples.mail:setup"))
    client = await aiohttp_client(app)
    for body in (b"[1, 2]", b'"a@example.com"', b"null", b"{nope", b'{"to": 7}'):
        response = await client.post(
            "/send", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status in (400, 422), (body, response.status)
        assert response.content_type == "application/problem+json"
        problem = await response.json()
        assert problem["status"] == response.status
        assert problem["detail"]
    listed = await (await client.get("/tasks")).json()
    assert listed["tasks"] == []  # nothing was enqueued


def test_embedded_app_listens_on_the_port_it_is_given(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody uses right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.embedded", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except (ConnectionError, urllib.error.URLError):
                assert proc.poll() is None, f"examples.embedded exited {proc.returncode}"
                assert time.monotonic() < deadline, "examples.embedded did not listen"
                time.sleep(0.05)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/images/cat.png", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 202
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
