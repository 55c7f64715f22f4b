"""Catching up on missed periodic runs stays bounded, however long the server was down."""

from __future__ import annotations

from taskserver.runtime.periodic import MAX_CATCH_UP, Schedule

NOW = 1_800_000_000.0  # a whole minute, so minute schedules line up


def test_short_outage_enqueues_every_missed_run() -> None:
    missed, skipped = Schedule("m", "* * * * *").due_after(NOW - 600, NOW)
    assert missed == [NOW - 540 + 60 * i for i in range(10)]
    assert skipped == 0


def test_a_year_down_keeps_the_newest_runs_and_counts_the_rest() -> None:
    missed, skipped = Schedule("m", "* * * * *").due_after(NOW - 365 * 86400, NOW)
    assert len(missed) == MAX_CATCH_UP
    assert missed[-1] == NOW
    assert skipped > 500_000
