"""The admin commands against a real `taskserver run` process and its database file."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .conftest import ROOT, ServerProcess


async def cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m taskserver ARGS``; returns (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskserver",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def enqueue(http: aiohttp.ClientSession, url: str, data: Any) -> int:
    async with http.post(f"{url}/tasks", json={"data": data}) as response:
        assert response.status == 202
        body: dict[str, Any] = await response.json()
        return int(body["id"])


async def ended(http: aiohttp.ClientSession, url: str, task_id: int) -> str:
    async with http.get(f"{url}/tasks/{task_id}?wait=10") as response:
        state: str = (await response.json())["state"]
        return state


async def test_admin_commands_against_a_running_server(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    db = str(tmp_path / "admin.db")
    server = run_server("--task-workers", "2", "--db", db)
    url = ["--url", server.url]
    async with aiohttp.ClientSession() as http:
        good = await enqueue(http, server.url, {"seconds": 0.05})
        bad = await enqueue(http, server.url, {"seconds": 0.05, "fail": True})
        assert await ended(http, server.url, good) == "succeeded"
        assert await ended(http, server.url, bad) == "failed"

        code, out, _ = await cli("tasks", "list", *url)
        assert code == 0
        assert "succeeded" in out
        assert "failed" in out
        assert "asked to fail" in out
        code, out, _ = await cli("tasks", "list", "--state", "failed", "--json", *url)
        assert code == 0
        assert [t["id"] for t in orjson.loads(out)["tasks"]] == [bad]
        code, out, _ = await cli("tasks", "show", str(bad), "--json", *url)
        assert (code, orjson.loads(out)["state"]) == (0, "failed")
        code, out, _ = await cli("stats", "--json", *url)
        assert code == 0
        assert orjson.loads(out)["workers"]["total"] == 2

        # Exit codes scripts can trust: refused 1, usage 2, not found 3.
        assert (await cli("tasks", "cancel", str(good), *url))[0] == 1
        assert (await cli("tasks", "show", "999", *url))[0] == 3
        code, _, err = await cli("tasks", "purge", "--older-than", "3x", *url)
        assert code == 2
        assert err.count("\n") == 1

        code, out, _ = await cli("tasks", "retry", str(bad), *url)
        assert (code, out.strip()) == (0, "re-queued 1 task(s)")
        assert await ended(http, server.url, bad) == "failed"  # it fails again, by design
        assert (await cli("tasks", "retry", str(good), *url))[0] == 1

        code, out, _ = await cli("tasks", "purge", "--older-than", "0", "--failed", *url)
        assert (code, out.strip()) == (0, "purged 1 task(s)")
        async with http.get(f"{server.url}/tasks/{bad}") as response:
            assert response.status == 404

        # Read the file itself, beside the running server.
        code, out, _ = await cli("tasks", "list", "--db", db, "--json")
        assert code == 0
        assert [t["id"] for t in orjson.loads(out)["tasks"]] == [good]
        code, out, _ = await cli("stats", "--db", db)
        assert code == 0
        assert "succeeded 1" in out
        assert (await cli("tasks", "show", str(bad), "--db", db))[0] == 3
    assert await asyncio.to_thread(server.terminate) == 0


async def test_unreachable_server_and_missing_file(tmp_path: Path) -> None:
    code, _, err = await cli("stats", "--url", "http://127.0.0.1:9")
    assert code == 4
    assert "cannot reach" in err
    code, _, err = await cli("tasks", "list", "--db", str(tmp_path / "none.db"))
    assert code == 2
    assert "cannot read" in err
    assert not (tmp_path / "none.db").exists()  # read-only: never creates it


async def test_retry_needs_ids_or_failed() -> None:
    code, _, err = await cli("tasks", "retry", "--url", "http://127.0.0.1:9")
    assert code == 2
    assert "give task ids or --failed" in err


async def test_every_command_exits_with_its_documented_code(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    db = str(tmp_path / "codes.db")
    server = run_server("--task-workers", "2", "--db", db)
    url = ["--url", server.url]
    async with aiohttp.ClientSession() as http:
        good = await enqueue(http, server.url, {"seconds": 0})
        assert await ended(http, server.url, good) == "succeeded"
        slow = await enqueue(http, server.url, {"seconds": 30})

        # 3: no such task, whatever the command.
        for args in (["show", "42"], ["cancel", "42"], ["retry", "42"]):
            code, _, err = await cli("tasks", *args, *url)
            assert (code, err.count("\n")) == (3, 1), (args, err)
            assert "task 42 does not exist" in err
        # Several ids: a line for each failure, the highest code (3 over 1).
        code, out, err = await cli("tasks", "retry", str(good), "42", str(slow), *url)
        assert (code, err.count("\n")) == (3, 3), err  # succeeded, missing, running
        assert (await cli("tasks", "show", "42", "--db", db))[0] == 3

        # 1: the server refused; the message names the task once.
        code, out, err = await cli("tasks", "retry", str(good), *url)
        assert code == 1
        assert out.strip() == "re-queued 0 task(s)"
        assert err.count(f"task {good}") == 1, err

        # 2: bad usage, one line; nothing is asked of the server (it is unreachable).
        for args in (
            ["tasks", "retry", "1", "--failed"],
            ["tasks", "retry"],
            ["tasks", "list", "--state", "done"],
            ["tasks", "list", "--state", "done", "--db", db],
            ["tasks", "purge", "--older-than", "soon"],
            ["tasks", "show", "seven"],
        ):
            code, _, err = await cli(*args, "--url", "http://127.0.0.1:9")
            assert (code, err.count("\n")) == (2, 1), (args, err)
        code, _, err = await cli("tasks", "list", "--state", "bogus", *url)  # the server says
        assert (code, err.count("\n")) == (2, 1), err

        # 0: done.
        for args in (["cancel", str(slow)], ["retry", str(slow)], ["list"], ["show", str(good)]):
            assert (await cli("tasks", *args, *url))[0] == 0, args
        assert (await cli("stats", *url))[0] == 0
        assert (await cli("tasks", "purge", "--older-than", "1d", *url))[0] == 0
        assert (await cli("tasks", "retry", "--failed", *url))[0] == 0
        assert (await cli("tasks", "cancel", str(slow), *url))[0] == 0

        # 4: unreachable, for every command that asks the server.
        asks = (["stats"], ["tasks", "list"], ["tasks", "cancel", "1"], ["tasks", "retry", "1"])
        for args in asks:
            code, _, err = await cli(*args, "--url", "http://127.0.0.1:9")
            assert (code, err.count("\n")) == (4, 1), (args, err)
    assert await asyncio.to_thread(server.terminate) == 0


async def test_show_prints_json_and_iso_times_for_people(
    run_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    db = str(tmp_path / "show.db")
    server = run_server("--task-workers", "1", "--db", db)
    async with aiohttp.ClientSession() as http:
        task_id = await enqueue(http, server.url, {"seconds": 0, "to": "a@example.com"})
        assert await ended(http, server.url, task_id) == "succeeded"
    for source in (["--url", server.url], ["--db", db]):
        code, out, _ = await cli("tasks", "show", str(task_id), *source)
        assert code == 0
        rows = dict(line.split(None, 1) for line in out.splitlines() if len(line.split()) > 1)
        assert orjson.loads(rows["data"]) == {"seconds": 0, "to": "a@example.com"}
        assert orjson.loads(rows["result"])["slept"] == 0
        for key in ("created_at", "started_at", "finished_at", "updated_at"):
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows[key]), rows[key]
    assert await asyncio.to_thread(server.terminate) == 0
