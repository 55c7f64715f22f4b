"""``GET /metrics``: scraped from real servers, parsed with prometheus_client's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from taskserver import TASKSERVER, ApiToken, Settings, TaskContext, TaskServer, attach
from taskserver.errors import PermanentError
from taskserver.web.metrics import METRICS

from .conftest import ClientFactory, noop_finish, wait_for
from .pg_server import PostgresServer
from .test_fanout import TASKS, big_result, stalled

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

METRICS_TOKEN = "prometheus-scrapes-with-this-0123"
READ_TOKEN = "a-reader-reads-tasks-only-0123456"


async def scrape(client: Client, **headers: str) -> Samples:
    """Every sample of ``/metrics``, keyed ``(name, sorted labels)``."""
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


async def flaky(ctx: TaskContext) -> Any:
    if ctx.data == "fail":
        raise PermanentError("asked to fail")
    if ctx.data == "once" and ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return ctx.data


async def test_counts_tasks_that_ran(make_client: ClientFactory) -> None:
    client = await make_client(flaky, retry_base=0.01, retry_jitter=0.0)
    server: TaskServer = client.app[TASKSERVER]
    ids = [
        await server.task("a", name="mail"),
        await server.task("b", name="mail"),
        await server.task("fail", name="mail"),
        await server.task("once", queue="slow", max_attempts=2),
    ]
    for task_id in ids:
        await server.wait_terminal(task_id, timeout=10)
    samples = await scrape(client)

    mail = {"queue": "default", "name": "mail"}
    assert value(samples, "taskserver_tasks_enqueued_total", **mail) == 3
    assert value(samples, "taskserver_tasks_enqueued_total", queue="slow", name="") == 1
    assert value(samples, "taskserver_tasks_finished_total", **mail, outcome="succeeded") == 2
    assert value(samples, "taskserver_tasks_finished_total", **mail, outcome="failed") == 1
    slow = {"queue": "slow", "name": ""}
    assert value(samples, "taskserver_tasks_finished_total", **slow, outcome="succeeded") == 1
    assert value(samples, "taskserver_task_retries_total", **slow) == 1
    # Five attempts ran (one retried), each started after a wait and measured.
    runs = value(samples, "taskserver_task_run_seconds_count", queue="default")
    runs += value(samples, "taskserver_task_run_seconds_count", queue="slow")
    assert runs == 5
    assert value(samples, "taskserver_task_queue_wait_seconds_count", queue="slow") == 2
    inf = value(samples, "taskserver_task_queue_wait_seconds_bucket", queue="default", le="+Inf")
    assert inf == 3
    assert value(samples, "taskserver_tasks", state="succeeded") == 3
    assert value(samples, "taskserver_tasks", state="failed") == 1
    assert value(samples, "taskserver_queue_depth", queue="default") == 0
    assert value(samples, "taskserver_workers") == 2
    assert value(samples, "taskserver_workers_busy") == 0
    # Every task and every outcome was a write: commits carried them.
    assert value(samples, "taskserver_commits_total") >= 2
    assert value(samples, "taskserver_commit_seconds_count") >= 2
    assert value(samples, "taskserver_commit_batch_size_sum") >= 4 * 2 + 5 * 2
    assert value(samples, "taskserver_commits_failed_total") == 0
    # The process collectors of the library ride along.
    assert value(samples, "process_resident_memory_bytes") > 0
    names = {name for name, _ in samples}
    for name in METRICS:
        assert any(n.startswith("taskserver_" + name) for n in names), name


async def test_queue_depth_and_oldest_age(settings: Settings, aiohttp_client: Any) -> None:
    now = [1_000_000.0]

    async def serve() -> tuple[TaskServer, Client]:
        server = TaskServer(Settings(db=settings.db, task_workers=0, port=0), clock=lambda: now[0])
        app = web.Application()
        attach(app, server)
        return server, await aiohttp_client(app)

    server, client = await serve()
    first = await server.task("x", queue="mail")
    now[0] += 30
    await server.task("y", queue="mail")
    await server.task("z", queue="mail", delay=600)  # waiting, not queued
    now[0] += 12
    samples = await scrape(client)
    assert value(samples, "taskserver_queue_depth", queue="mail") == 2
    assert value(samples, "taskserver_queue_oldest_age_seconds", queue="mail") == 42
    assert value(samples, "taskserver_tasks", state="waiting") == 1

    await server.cancel(first)
    samples = await scrape(client)
    assert value(samples, "taskserver_queue_depth", queue="mail") == 1
    assert value(samples, "taskserver_queue_oldest_age_seconds", queue="mail") == 12
    cancelled = {"queue": "mail", "name": "", "outcome": "cancelled"}
    assert value(samples, "taskserver_tasks_finished_total", **cancelled) == 1

    # The delayed task comes due: it is queued from its due time on.
    now[0] += 600
    server.poke()
    await wait_for(lambda: server.stats()["queued"] == 2, message="the delayed task due")
    samples = await scrape(client)
    assert value(samples, "taskserver_queue_depth", queue="mail") == 2
    assert value(samples, "taskserver_queue_oldest_age_seconds", queue="mail") == 612

    # What waits on disk is counted again by the next process.
    await client.close()
    _, client = await serve()
    samples = await scrape(client)
    assert value(samples, "taskserver_queue_depth", queue="mail") == 2
    assert value(samples, "taskserver_queue_oldest_age_seconds", queue="mail") == 612
    assert value(samples, "taskserver_tasks_enqueued_total", queue="mail", name="") == 0


async def test_streams_and_dropped_subscribers(make_client: ClientFactory) -> None:
    client = await make_client(
        big_result, task_workers=2, subscriber_queue=50, mercure_anonymous=True, heartbeat=30.0
    )
    server: TaskServer = client.app[TASKSERVER]
    async with (
        stalled(client, "/events"),
        stalled(client, "/.well-known/mercure?topic=*"),
    ):
        await wait_for(lambda: len(server.fanout) == 2, message="both streams subscribed")
        samples = await scrape(client)
        assert value(samples, "taskserver_sse_subscribers") == 1
        assert value(samples, "taskserver_mercure_subscribers") == 1
        assert value(samples, "taskserver_subscribers_dropped_total") == 0

        # Neither reads: once their sockets are full, more events than they may hold.
        for n in range(TASKS):
            await server.task(n)
        await wait_for(lambda: server.fanout.dropped == 2, message="both streams dropped")
        samples = await scrape(client)
        assert value(samples, "taskserver_subscribers_dropped_total") == 2
        assert value(samples, "taskserver_sse_subscribers") == 0


async def test_needs_the_metrics_scope(make_client: ClientFactory) -> None:
    tokens = (
        ApiToken.create("prometheus", METRICS_TOKEN, ["metrics"]),
        ApiToken.create("reader", READ_TOKEN, ["read"]),
    )
    client = await make_client(api_tokens=tokens)
    assert (await client.get("/metrics")).status == 401
    reader = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert (await client.get("/metrics", headers=reader)).status == 403
    scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert value(await scrape(client, **scraper), "taskserver_workers") == 2
    assert (await client.get("/tasks", headers=scraper)).status == 403


async def test_each_server_has_its_own_registry(
    settings: Settings, aiohttp_client: Any, tmp_path: Path
) -> None:
    clients = []
    for i in range(2):
        server = TaskServer(Settings(db=str(tmp_path / f"{i}.db"), task_workers=1, port=0))
        server.on("task", flaky)
        server.on("finish", noop_finish)
        app = web.Application()
        attach(app, server)
        clients.append(await aiohttp_client(app))
        for _ in range(i + 1):
            await server.wait_terminal(await server.task("ok"), timeout=10)
    for i, client in enumerate(clients):
        samples = await scrape(client)
        finished = {"queue": "default", "name": "", "outcome": "succeeded"}
        assert value(samples, "taskserver_tasks_finished_total", **finished) == i + 1


async def test_openmetrics_when_asked(make_client: ClientFactory) -> None:
    client = await make_client()
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    response = await client.get("/metrics", headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).endswith("# EOF\n")


async def test_queue_depth_on_a_shared_database(
    postgres: PostgresServer, aiohttp_client: Any
) -> None:
    # Two servers on one PostgreSQL database: what one enqueues, the other's scrape counts.
    dsn = await postgres.create_database_async()
    clients = []
    for name in ("a", "b"):
        server = TaskServer(Settings(db=dsn, node_name=name, task_workers=0, port=0))
        app = web.Application()
        attach(app, server)
        clients.append(await aiohttp_client(app))
    first: TaskServer = clients[0].app[TASKSERVER]
    for _ in range(3):
        await first.task("x", queue="mail")
    samples = await scrape(clients[1])
    assert value(samples, "taskserver_queue_depth", queue="mail") == 3
    assert ("taskserver_queue_oldest_age_seconds", (("queue", "mail"),)) not in samples
    assert first.tally.depths == {}  # nothing tracked in memory: it could only drift
