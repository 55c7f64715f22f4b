"""schemathesis against a live ``taskserver run``: no 5xx, every response as documented.

The server runs the demo (its tasks sleep and report progress) with an API token, so
every protected route's 401/403 and every scoped success are reachable. Event streams
are excluded: they stay open until their task ends, and their body is not JSON.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case

from taskserver import Settings
from taskserver.web.openapi import document

from .conftest import LISTENING, ROOT

TOKEN = "fuzz-token-0123456789-0123456789-abcdef"
#: Examples per operation: about 20 operations, well under a minute on 2 cores.
EXAMPLES = 25


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``taskserver run`` subprocess on a loopback port, for the whole module."""
    tmp = tmp_path_factory.mktemp("fuzz")
    log = tmp / "server.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT),
        "TASKSERVER_API_TOKEN": TOKEN,
    }
    args = ["--port", "0", "--db", str(tmp / "t.db"), "--task-workers", "2"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "taskserver", "run", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    try:
        deadline = time.monotonic() + 20
        while not (match := LISTENING.search(log.read_text())):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(30)
    errors = [line for line in log.read_text().splitlines() if "Traceback" in line]
    assert not errors, log.read_text()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One connection pool, closed at the end (a session per call leaks its socket)."""
    with requests.Session() as session:
        yield session


#: The document as built; the live server serves the same (checked below).
schema = schemathesis.openapi.from_dict(document(Settings())).exclude(
    path_regex=r"(/events$|^/\.well-known/mercure$)", method="GET"
)


def _fits(value: Any) -> bool:
    """Whether every integer in ``value`` fits in 64 bits, as the server requires of data."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**64
    if isinstance(value, dict):
        return all(_fits(v) for v in value.values())
    if isinstance(value, list):
        return all(_fits(v) for v in value)
    return True


@schema.hook("filter_body")
def _narrow_integers(context: Any, body: Any) -> bool:
    # "data: any JSON value" cannot say "integers within 64 bits" in JSON Schema.
    return _fits(body)


def _integral(value: Any) -> Any:
    """``value`` with integral floats (``2.0``) written as integers (``2``)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


@schema.hook("map_body")
def _integers_without_fraction(context: Any, body: Any) -> Any:
    # JSON Schema's integer includes 2.0; the server takes integers written as such.
    return _integral(body)


@schema.hook("map_query")
def _short_waits(context: Any, query: Any) -> Any:
    # ?wait= long-polls up to 60 s by design; a second shows it works and keeps this fast.
    if isinstance(query, dict) and isinstance(query.get("wait"), int) and query["wait"] > 1:
        query["wait"] = 1
    return query


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(
    case: Case[Any], live_url: str, http: requests.Session
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    case.call_and_validate(base_url=live_url, session=http, headers=auth, timeout=10)


def test_document_served_is_the_one_built(live_url: str) -> None:
    served = requests.get(f"{live_url}/openapi.json", timeout=10).json()
    built = orjson.loads(orjson.dumps(document(Settings())))
    for doc in (served, built):  # its bound moves with the clock
        doc["components"]["schemas"]["NewTask"]["properties"].pop("available_at")
    assert served == built
