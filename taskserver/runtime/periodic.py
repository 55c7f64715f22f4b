"""Periodic tasks: cron schedules declared at setup, each due time enqueued exactly once.

The store records, per schedule, the latest due time already enqueued, in the
same transaction as the task it enqueued. So a restart neither repeats a run nor
drops one: runs missed while the server was down are enqueued when it starts
(up to ``MAX_CATCH_UP`` per schedule; beyond that the oldest are skipped and a
warning says how many).

Cron expressions are parsed by ``cronsim`` (5 fields, plus an optional seconds
field; the healthchecks.io parser), evaluated in UTC unless ``tz`` says otherwise.
The shorthands of Vixie cron (``@hourly``, ``@daily``, ...) are translated here:
cronsim knows none of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

from ..errors import ConfigError, ServerBusy, ValidationError

log = logging.getLogger(__name__)

#: Missed runs enqueued at start, per schedule, before older ones are skipped.
MAX_CATCH_UP = 100
#: Vixie cron's shorthands and what they stand for (``@reboot`` has no due times).
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True, slots=True)
class Schedule:
    """A named cron schedule and the task it enqueues."""

    name: str
    cron: str
    data: Any = None
    options: dict[str, Any] = field(default_factory=dict)
    tz: str = "UTC"

    def zone(self) -> tzinfo:
        return UTC if self.tz == "UTC" else ZoneInfo(self.tz)

    @property
    def expression(self) -> str:
        """``cron`` with a shorthand (``@daily``) spelt out in fields."""
        return ALIASES.get(self.cron.strip().lower(), self.cron)

    def check(self) -> None:
        """Raise ``ConfigError`` naming the schedule when the expression or zone is bad."""
        if self.expression.startswith("@"):
            raise ConfigError(
                f"schedule {self.name!r}: unknown cron shorthand {self.cron!r}; "
                f"use fields or one of {', '.join(ALIASES)}"
            )
        try:
            self.zone()
            CronSim(self.expression, datetime.now(UTC))
        except (CronSimError, ValueError, KeyError) as exc:
            raise ConfigError(f"schedule {self.name!r}: bad cron {self.cron!r}: {exc}") from None

    def due_after(self, after: float, until: float) -> tuple[list[float], int]:
        """Due times in ``(after, until]``, oldest first: at most ``MAX_CATCH_UP`` (the
        newest), and how many older ones were left out (estimated past a long outage)."""
        times: list[float] = []
        start = datetime.fromtimestamp(after, self.zone())
        for moment in CronSim(self.expression, start):
            ts = moment.timestamp()
            if ts > until:
                break
            times.append(ts)
            if len(times) > 10 * MAX_CATCH_UP:
                # A long outage with a fast schedule: do not walk every missed minute
                # of it on the event loop; jump near the end and estimate the rest.
                period = (ts - after) / len(times)
                jump = until - period * 2 * MAX_CATCH_UP
                tail, _ = self.due_after(jump, until)
                return tail, int((jump - after) / period) if period > 0 else 0
        return times[-MAX_CATCH_UP:], max(0, len(times) - MAX_CATCH_UP)

    def next_after(self, after: float) -> float:
        """The first due time after ``after``."""
        start = datetime.fromtimestamp(after, self.zone())
        return next(iter(CronSim(self.expression, start))).timestamp()


Enqueue = Callable[[Schedule, float], Awaitable[None]]


async def run_schedules(
    schedules: dict[str, Schedule],
    last_due: dict[str, float],
    enqueue: Enqueue,
    clock: Callable[[], float],
) -> None:
    """Enqueue every schedule's runs, each due time once; first catch up on missed ones.

    ``last_due`` is what the store recorded (the newest due time enqueued per
    schedule); ``enqueue(schedule, due)`` must record the new one in the same
    transaction as the task. Runs until cancelled; a run that cannot be
    enqueued (the server is full) is logged, never silently dropped.
    """
    now = clock()
    next_due: dict[str, float] = {}
    for name, schedule in schedules.items():
        if name not in last_due:
            next_due[name] = schedule.next_after(now)
            continue
        missed, skipped = schedule.due_after(last_due[name], now)
        if skipped:
            log.warning(
                "schedule %r: %d runs missed while stopped are skipped; enqueueing the newest %d",
                name,
                skipped,
                len(missed),
            )
        for due in missed:
            await _enqueue_logged(enqueue, schedule, due)
        next_due[name] = schedule.next_after(max(last_due[name], now))
    while next_due:
        name = min(next_due, key=next_due.__getitem__)
        due = next_due[name]
        await asyncio.sleep(max(0.0, due - clock()))
        await _enqueue_logged(enqueue, schedules[name], due)
        next_due[name] = schedules[name].next_after(due)


async def _enqueue_logged(enqueue: Enqueue, schedule: Schedule, due: float) -> None:
    try:
        await enqueue(schedule, due)
    except (ServerBusy, ValidationError) as exc:
        log.error(
            "schedule %r: could not enqueue the run due at %s: %s",
            schedule.name,
            due,
            exc,
            extra={"schedule": schedule.name},
        )
