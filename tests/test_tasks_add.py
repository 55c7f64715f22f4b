"""``taskserver tasks add`` against a real ``taskserver run`` (the demo's tasks)."""

from __future__ import annotations

import asyncio
import os
import pty
import sys
from collections.abc import Callable

import orjson
import pytest

from .conftest import ROOT, ServerProcess
from .test_admin_cli import cli

TOKEN = "tasks-add-token-0123456789-abcdefghij"


async def test_add_and_wait_with_plain_lines(
    run_server: Callable[..., ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = run_server("--task-workers", "1", env={"TASKSERVER_API_TOKEN": TOKEN})
    url = ["--url", server.url]
    with monkeypatch.context() as patched:
        patched.setenv("TASKSERVER_API_TOKEN", TOKEN)  # the CLI's children inherit it
        code, out, err = await cli("tasks", "add", '{"seconds": 0.1}', "--wait", *url)
        assert code == 0, err
        assert orjson.loads(out)["slept"] == 0.1  # only the result on stdout
        lines = err.splitlines()
        assert lines[0] == "queued"
        assert "progress 50% step 5 of 10" in lines
        assert lines[-1] == "finished"

        code, out, err = await cli("tasks", "add", '{"seconds": 0, "fail": true}', "--wait", *url)
        assert code == 1
        assert "task 2 failed: PermanentError: asked to fail half way" in err

        code, out, _ = await cli("tasks", "add", "[1]", "--queue", "q1", "--priority", "5", *url)
        assert code == 0
        task_id = int(out)
        code, out, _ = await cli("tasks", "show", str(task_id), "--json", *url)
        shown = orjson.loads(out)
        assert (shown["queue"], shown["priority"], shown["data"]) == ("q1", 5, [1])

        code, _, err = await cli("tasks", "add", "{nope", *url)
        assert code == 2
        assert err.count("\n") == 1
        assert "DATA is not valid JSON" in err
        code, _, err = await cli("tasks", "add", "1", "--priority", "5000", *url)
        assert code == 2
        assert "(priority)" in err
    code, _, err = await cli("tasks", "add", "1", *url)  # no token now
    assert code == 1
    assert "bearer token" in err


async def test_add_wait_draws_a_progress_bar_on_a_terminal(
    run_server: Callable[..., ServerProcess],
) -> None:
    server = run_server("--task-workers", "1")
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskserver",
        "tasks",
        "add",
        '{"seconds": 0.1}',
        "--wait",
        "--url",
        server.url,
        cwd=ROOT,
        stdout=slave,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = asyncio.create_task(asyncio.to_thread(drain))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    await asyncio.wait_for(reader, 10)
    os.close(master)
    text = b"".join(chunks).decode()
    assert proc.returncode == 0, err
    assert "\r\x1b[2K[" in text  # redrawn in place
    assert "[########################] 100% finished: step 10 of 10" in text
    assert '"slept": 0.1' in text
