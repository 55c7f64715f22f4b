"""The mixed workload: durable tasks/s when tasks use priorities, delays, retries and groups.

Run by ``bench.py`` as ``python -m benchmarks.inproc mixed ...`` (one fresh
process, like every in-process scenario), beside ``inproc throughput`` with the
same task count, producers and workers, so the two figures are measured the same
way in the same run: ``--producers`` coroutines loop on
``await server.task(data, **options)`` until ``--tasks`` are issued, and the
clock stops when the ``finish`` callback has run for every one of them.

The workload, drawn from a fixed seed so every run issues the same tasks:

- three declared queues: ``high`` (priority 10), ``normal`` (0) and ``bulk``
  (-10, at most ``BULK_CONCURRENCY`` tasks running at once), taking 20%, 50%
  and 30% of the tasks;
- a per-task priority from 0 to 9;
- ``DELAYED`` of the tasks delayed by 5 to 50 ms;
- ``FAILING`` of them raising on their first attempt and succeeding on the
  second (every task has ``max_attempts=2`` and ``RETRY``, 10 ms, no jitter);
- ``GROUPED`` of them in one of ``GROUPS`` serial groups.

Reported: tasks/s end to end, p50/p99 enqueue→finish latency (under this load)
of the tasks neither delayed nor failing, and the retries the ``task`` callback
saw.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from taskserver import RetryPolicy, TaskContext, TaskServer

from .common import cpu_seconds_self, now, peak_rss_self
from .harness import BenchFailed, Finishes, serving, summary

SEED = 20240611
#: Queue name -> (priority, concurrency limit, share of the tasks).
BULK_CONCURRENCY = 2
QUEUES: dict[str, tuple[int, int | None, float]] = {
    "high": (10, None, 0.2),
    "normal": (0, None, 0.5),
    "bulk": (-10, BULK_CONCURRENCY, 0.3),
}
DELAYED = 0.10
DELAY_RANGE = (0.005, 0.050)
FAILING = 0.10
RETRY = RetryPolicy(base=0.01, jitter=0.0)
GROUPED = 0.05
GROUPS = 8


class FailsOnce(Exception):
    """Raised by a failing task on its first attempt."""


@dataclass(frozen=True, slots=True)
class Plan:
    """One task to issue: its data and options, and whether it is delayed or fails once."""

    data: dict[str, int]
    options: dict[str, Any]
    timed: bool  # neither delayed nor failing: its latency is reported


def plan(count: int, seed: int = SEED) -> list[Plan]:
    """The ``count`` tasks of the mixed workload, the same for the same ``seed``."""
    rng = random.Random(seed)
    names = list(QUEUES)
    shares = [share for _, _, share in QUEUES.values()]
    plans: list[Plan] = []
    for n in range(count):
        data = {"n": n}
        options: dict[str, Any] = {
            "queue": rng.choices(names, shares)[0],
            "priority": rng.randrange(10),
            "max_attempts": 2,
            "retry": RETRY,
        }
        delayed = rng.random() < DELAYED
        if delayed:
            options["delay"] = rng.uniform(*DELAY_RANGE)
        failing = rng.random() < FAILING
        if failing:
            data["fail"] = 1
        if rng.random() < GROUPED:
            options["serial_group"] = f"group-{rng.randrange(GROUPS)}"
        plans.append(Plan(data, options, timed=not (delayed or failing)))
    return plans


def declare_queues(server: TaskServer) -> None:
    """Declare the workload's queues on ``server`` (before it starts)."""
    for name, (priority, concurrency, _) in QUEUES.items():
        server.queue(name, priority=priority, concurrency=concurrency)


class MixedFinishes(Finishes):
    """``Finishes`` whose ``task`` fails once where asked, counting retries and latencies."""

    def __init__(self, plans: list[Plan]) -> None:
        super().__init__()
        self.plans = plans
        #: When ``task()`` was called for task ``n``, set by the producers.
        self.enqueued: list[float] = [0.0] * len(plans)
        self.latencies: list[float] = []
        self.retries = 0
        self.failures = 0

    async def task(self, ctx: TaskContext) -> None:
        """The ``task`` callback: a no-op, or a failure on the first attempt of a failing task."""
        if ctx.attempt > 1:
            self.retries += 1
        elif "fail" in ctx.data:
            self.failures += 1
            raise FailsOnce("fails on its first attempt, as planned")

    async def finish(self, ctx: TaskContext, result: Any) -> None:
        """The ``finish`` callback: count, and time the tasks neither delayed nor failing."""
        n = ctx.data.get("n")
        if n is not None and self.plans[n].timed:
            self.latencies.append(now() - self.enqueued[n])
        await super().finish(ctx, result)


async def mixed_throughput(
    db: str, *, tasks: int, producers: int, workers: int, warmup: int, time_limit: float
) -> dict[str, Any]:
    """Durable tasks per second of the mixed workload, ``task()`` to ``finish`` for all."""
    plans = plan(tasks)
    finishes = MixedFinishes(plans)
    warnings: list[str] = []
    async with serving(db, workers, finishes, warnings, setup=declare_queues) as server:
        # Warm up as ``throughput`` does: plain no-op tasks, default queue.
        issued_warmup = 0

        async def warm() -> None:
            nonlocal issued_warmup
            while issued_warmup < warmup:
                issued_warmup += 1
                await server.task({"w": issued_warmup})

        try:
            async with asyncio.timeout(time_limit):
                await asyncio.gather(*(warm() for _ in range(min(producers, warmup))))
        except TimeoutError:
            raise BenchFailed(
                f"the {warmup} warm-up tasks were not acked in {time_limit:g}s"
            ) from None
        if not await finishes.until(warmup, time_limit):
            raise BenchFailed(f"the {warmup} warm-up tasks did not finish within {time_limit:g}s")

        issued = 0
        enqueued = finishes.enqueued

        async def produce() -> None:
            nonlocal issued
            while issued < tasks:
                n = issued
                issued += 1
                item = plans[n]
                enqueued[n] = now()
                await server.task(item.data, **item.options)

        commits_before = server.stats()["commits"]
        cpu_before = cpu_seconds_self()
        start = now()
        jobs = [asyncio.create_task(produce()) for _ in range(producers)]
        ok = True
        try:
            async with asyncio.timeout(time_limit):
                await asyncio.gather(*jobs)
        except TimeoutError:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            ok = False
        acked = now() - start
        if ok:
            ok = await finishes.until(warmup + tasks, max(0.1, time_limit - acked))
        elapsed = now() - start
        cpu = cpu_seconds_self() - cpu_before
        commits = server.stats()["commits"] - commits_before
    finished = finishes.count - warmup
    return {
        "tasks": tasks,
        "finished": finished,
        "completed": ok,
        "seconds": elapsed,
        "per_second": finished / elapsed,
        "acked_per_second": tasks / acked if ok else None,
        "commits": commits,
        "cpu_percent": 100 * cpu / elapsed,
        "latency": summary(finishes.latencies),
        "retries": finishes.retries,
        "failures": finishes.failures,
        "planned": {
            "delayed": sum("delay" in p.options for p in plans),
            "failing": sum("fail" in p.data for p in plans),
            "grouped": sum("serial_group" in p.options for p in plans),
            "per_queue": {q: sum(p.options["queue"] == q for p in plans) for q in QUEUES},
        },
        "peak_rss": peak_rss_self(),
        "warnings": warnings,
    }
