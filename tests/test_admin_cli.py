"""The admin commands against a real `taskserver run` process and its database file."""

from __future__ import annotations

import asyncio
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
