"""``GET /metrics``: the server's measurements in the Prometheus exposition format.

Built with ``prometheus_client``, the ecosystem's library: a ``CollectorRegistry`` of
this server's own (several servers may share a process, as tests do) holding one
custom collector that reads, at scrape time, what the server already counts
(``runtime/tally.py``, ``measure.py``, the worker pool, the fan-out, the hub): the
hot path pays nothing for a scrape, and a scrape costs O(series), never a read of
the store (except on a database several servers share: one count of the queued tasks
per queue, since others enqueue and claim too; the oldest age is then not reported).
The process collectors (CPU, memory, open files, GC) are added too.
OpenMetrics is answered when the scraper asks for it (``Accept``).

Every metric is listed, with its meaning, in ``METRICS`` and in the README.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from ..lifecycle import QUEUED
from ..measure import Histogram
from ..push.mercure import MercureHub
from ..server import TaskServer

PREFIX = "taskserver_"

#: name (without ``taskserver_``) -> help text; a test checks every one is exposed.
METRICS = {
    "tasks_enqueued": "tasks stored by enqueueing, by queue and name",
    "tasks_finished": "tasks that ended, by queue, name and outcome (succeeded, failed, cancelled)",
    "task_retries": "failed attempts scheduled for a retry, by queue and name",
    "task_run_seconds": "run time of each attempt, by queue",
    "task_queue_wait_seconds": "seconds from a task's due time to its start, by queue",
    "tasks": "tasks in each state",
    "queue_depth": "queued tasks per queue, in memory and on disk",
    "queue_oldest_age_seconds": "seconds the oldest queued task of a queue has been due"
    " (to the second; 0 when none waits)",
    "queue_running": "tasks running per queue",
    "workers": "task workers configured",
    "workers_busy": "task workers running a task now",
    "sse_subscribers": "open event streams of the API (/events, /tasks/{id}/events)",
    "mercure_subscribers": "open event streams of the Mercure hub",
    "subscribers_dropped": "event streams cut off because the client read too slowly",
    "commits": "transactions committed",
    "commits_failed": "transactions that failed and were rolled back",
    "commit_batch_size": "writes (rows and events) per transaction",
    "commit_seconds": "seconds each transaction took to commit",
}


def _histogram(
    family: HistogramMetricFamily, labels: list[str], histogram: Histogram
) -> HistogramMetricFamily:
    buckets = [(_le(bound), count) for bound, count in histogram.cumulative()]
    family.add_metric(labels, buckets, histogram.sum)
    return family


def _le(bound: float) -> str:
    """A bucket bound as the exposition writes it (``0.5``, ``10.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, METRICS[name], value=value)


class ServerCollector(Collector):
    """Reads one server's measurements whenever the registry is collected."""

    def __init__(self, server: TaskServer, hub: MercureHub | None) -> None:
        self.server = server
        self.hub = hub
        #: queued tasks per queue read from a shared database for this scrape, else None
        self.shared_depths: dict[str, int] | None = None

    def describe(self) -> list[Metric]:
        return []  # names are fixed and ours: no clash check at register time

    def collect(self) -> Iterator[Metric]:
        stats = self.server.stats()  # from memory: O(queues)
        yield from self._tasks(stats)
        yield from self._queues(stats)
        yield from self._streams()
        yield from self._store()

    def _tasks(self, stats: dict[str, Any]) -> Iterator[Metric]:
        tally = self.server.tally
        enqueued = CounterMetricFamily(
            PREFIX + "tasks_enqueued", METRICS["tasks_enqueued"], labels=["queue", "name"]
        )
        for (queue, name), n in tally.enqueued.items():
            enqueued.add_metric([queue, name or ""], n)
        yield enqueued
        finished = CounterMetricFamily(
            PREFIX + "tasks_finished",
            METRICS["tasks_finished"],
            labels=["queue", "name", "outcome"],
        )
        for (queue, name, state), n in tally.finished.items():
            finished.add_metric([queue, name or "", state.value], n)
        yield finished
        retries = CounterMetricFamily(
            PREFIX + "task_retries", METRICS["task_retries"], labels=["queue", "name"]
        )
        for (queue, name), n in tally.retries.items():
            retries.add_metric([queue, name or ""], n)
        yield retries
        for name, table in (
            ("task_run_seconds", tally.run_seconds),
            ("task_queue_wait_seconds", tally.wait_seconds),
        ):
            family = HistogramMetricFamily(PREFIX + name, METRICS[name], labels=["queue"])
            for queue, histogram in table.items():
                _histogram(family, [queue], histogram)
            yield family
        states = GaugeMetricFamily(PREFIX + "tasks", METRICS["tasks"], labels=["state"])
        for state, n in stats["tasks"].items():
            states.add_metric([state], n)
        yield states

    def _queues(self, stats: dict[str, Any]) -> Iterator[Metric]:
        server = self.server
        depths = server.tally.depths
        held = stats["queues"]
        now = server.now()
        depth = GaugeMetricFamily(PREFIX + "queue_depth", METRICS["queue_depth"], labels=["queue"])
        age = GaugeMetricFamily(
            PREFIX + "queue_oldest_age_seconds",
            METRICS["queue_oldest_age_seconds"],
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            PREFIX + "queue_running", METRICS["queue_running"], labels=["queue"]
        )
        # Declared queues and the default one always: a series that vanishes when idle
        # would read as missing data, not as zero.
        shared = self.shared_depths
        for queue in sorted({"default", *depths, *held, *(shared or ())}):
            running.add_metric([queue], int(held.get(queue, {}).get("running") or 0))
            if shared is not None:  # a shared database: its counts, no age known here
                depth.add_metric([queue], shared.get(queue, 0))
                continue
            tasks = depths.get(queue)
            oldest = tasks.oldest() if tasks is not None else None
            depth.add_metric([queue], tasks.count if tasks is not None else 0)
            age.add_metric([queue], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield depth
        if shared is None:
            yield age
        yield running
        workers = stats["workers"]
        yield _gauge("workers", workers["total"])
        yield _gauge("workers_busy", workers["busy"])

    def _streams(self) -> Iterator[Metric]:
        fanout = self.server.fanout
        mercure = len(self.hub.connections) if self.hub is not None else 0
        yield _gauge("sse_subscribers", max(0, len(fanout) - mercure))
        yield _gauge("mercure_subscribers", mercure)
        yield CounterMetricFamily(
            PREFIX + "subscribers_dropped", METRICS["subscribers_dropped"], value=fanout.dropped
        )

    def _store(self) -> Iterator[Metric]:
        store = self.server.opened_store
        if store is None:
            return  # not started, or stopped: nothing committed to tell
        yield CounterMetricFamily(PREFIX + "commits", METRICS["commits"], value=store.commits)
        yield CounterMetricFamily(
            PREFIX + "commits_failed", METRICS["commits_failed"], value=store.failed_commits
        )
        for name, histogram in (
            ("commit_batch_size", store.batch_sizes),
            ("commit_seconds", store.commit_seconds),
        ):
            yield _histogram(HistogramMetricFamily(PREFIX + name, METRICS[name]), [], histogram)


class Metrics:
    """One server's registry and the ``/metrics`` handler that serves it."""

    def __init__(self, server: TaskServer, hub: MercureHub | None) -> None:
        self.server = server
        self.collector = ServerCollector(server, hub)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """``GET /metrics`` → the exposition, text or OpenMetrics as ``Accept`` asks."""
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        store = self.server.opened_store
        if store is not None and store.shared:
            # Other servers enqueue and claim: only the database knows the depths.
            counts = await store.count_by_queue()
            depths = {queue: by_state.get(QUEUED, 0) for queue, by_state in counts.items()}
            self.collector.shared_depths = depths
        body = encode(self.registry)  # no await since the read: this scrape's depths
        return web.Response(body=body, headers={"Content-Type": content_type})
