"""``log_format = "json"`` and the access log, read from a real ``taskserver run``."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

from .conftest import ServerProcess


def _request(url: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def _lines(server: ServerProcess) -> list[dict[str, Any]]:
    """Every line the server wrote (stderr and stdout), each parsed as one JSON object."""
    lines = server.log.read_text().splitlines()
    assert lines
    return [json.loads(line) for line in lines]  # a line that is not JSON fails here


def test_json_lines_with_the_task_and_an_access_log(
    run_server: Callable[..., ServerProcess],
) -> None:
    server = run_server(
        "--log-format",
        "json",
        "--access-log",
        "true",
        "--app",
        "tests.helpers:setup_failing_finish",
    )
    created = _request(server.url + "/tasks", {"data": "hello", "queue": "mail"})
    ended = _request(f"{server.url}/tasks/{created['id']}?wait=10")
    assert ended["state"] == "succeeded"
    assert server.terminate() == 0
    lines = _lines(server)
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["time"].endswith("+00:00")
    assert any("listening on" in line["message"] for line in lines)
    (failed,) = [line for line in lines if "finish callback failed" in line["message"]]
    assert failed["level"] == "ERROR"
    assert failed["logger"] == "taskserver.runtime.workers"
    assert (failed["task_id"], failed["queue"]) == (created["id"], "mail")
    assert "RuntimeError: finish failed for 'hello'" in failed["exception"]
    access = [line for line in lines if line["logger"] == "taskserver.access"]
    post = next(line for line in access if line["method"] == "POST")
    assert (post["path"], post["status"], post["client"]) == ("/tasks", 202, "127.0.0.1")
    assert isinstance(post["duration_ms"], float)
    get = next(line for line in access if line["method"] == "GET")
    assert (get["path"], get["status"]) == (f"/tasks/{created['id']}", 200)
    assert "?" not in get["path"], "no query string: it may carry a token"


def test_the_access_log_names_the_client_a_trusted_proxy_reports(
    run_server: Callable[..., ServerProcess],
) -> None:
    forged = {"X-Forwarded-For": "203.0.113.7"}
    clients = {}
    for trusted in ("10.0.0.0/8", "127.0.0.1"):
        server = run_server(
            "--log-format", "json", "--access-log", "true", "--trusted-proxies", trusted
        )
        _request(server.url + "/stats", headers=forged)
        assert server.terminate() == 0
        (line,) = [line for line in _lines(server) if line["logger"] == "taskserver.access"]
        clients[trusted] = line["client"]
    assert clients == {"10.0.0.0/8": "127.0.0.1", "127.0.0.1": "203.0.113.7"}


def test_text_is_the_default_and_no_access_log(run_server: Callable[..., ServerProcess]) -> None:
    server = run_server()
    _request(server.url + "/stats")
    assert server.terminate() == 0
    text = server.log.read_text()
    assert " INFO taskserver: taskserver listening on http://" in text
    assert "GET /stats" not in text
