"""The task lifecycle: every state transition, and the sets of states they use.

Workers, the server and storage ask this module instead of writing state
literals. Each transition sets the fields that go with the move (attempts,
times, the error) on the caller's ``Task``; writing it down (a full row and its
event) is the caller's job, through storage::

    queued ─▶ running ─▶ succeeded
      ▲  │        ├──▶ retrying ─(due)─▶ queued
      │  │        ├──▶ failed      (permanent error or attempts used up)
      │  └────────┴──▶ cancelled
      └── waiting (held by its serial group, delayed, or asked to wait)

It sits beside ``models``, below storage, so that the storage backends can
build their conditional moves from the same sets.
"""

from __future__ import annotations

from .models import Task, TaskState

QUEUED = TaskState.QUEUED
WAITING = TaskState.WAITING
RUNNING = TaskState.RUNNING
RETRYING = TaskState.RETRYING
SUCCEEDED = TaskState.SUCCEEDED
FAILED = TaskState.FAILED
CANCELLED = TaskState.CANCELLED

#: States a task can still leave; it holds or will hold a worker.
ACTIVE: frozenset[TaskState] = frozenset({QUEUED, WAITING, RUNNING, RETRYING})
#: Active states in the order people read them.
ACTIVE_ORDER: tuple[TaskState, ...] = (QUEUED, WAITING, RUNNING, RETRYING)
#: States a task never leaves (short of a manual retry).
TERMINAL: frozenset[TaskState] = frozenset({SUCCEEDED, FAILED, CANCELLED})
#: Ended states in the order people read them (what a purge deletes by default).
TERMINAL_ORDER: tuple[TaskState, ...] = (SUCCEEDED, FAILED, CANCELLED)
#: States a task waits on disk in: cancellable without a worker's help, and what
#: holds a serial group's turn.
ON_DISK: tuple[TaskState, ...] = (QUEUED, WAITING, RETRYING)
#: States that wait for a due time (``available_at``).
DELAYED: tuple[TaskState, ...] = (WAITING, RETRYING)
#: States a manual retry may move back to ``queued``.
RETRYABLE: tuple[TaskState, ...] = (FAILED, CANCELLED)
#: States that count against ``max_queued``.
BACKLOG: tuple[TaskState, ...] = (QUEUED, WAITING)


def initial_state(available_at: float, now: float) -> TaskState:
    """A new task starts ``queued`` when due by ``now``, else ``waiting``."""
    return QUEUED if available_at <= now else WAITING


def start(task: Task, now: float) -> None:
    """``queued -> running``: the attempt is counted, what a previous one left is cleared."""
    task.state = RUNNING
    task.attempts += 1
    task.started_at = now
    task.progress = task.message = task.error = task.traceback = task.hook_error = None


def end(task: Task, state: TaskState, now: float) -> None:
    """``running (or queued in memory) -> state``, one of ``TERMINAL``."""
    task.state = state
    task.finished_at = now


def postpone(task: Task, available_at: float) -> None:
    """``running -> waiting`` (the callback asked to run later): the attempt is handed back."""
    task.attempts -= 1
    task.state = WAITING
    task.available_at = available_at


def retry_later(task: Task, available_at: float) -> None:
    """``running -> retrying`` after a failed attempt that has attempts left."""
    task.state = RETRYING
    task.available_at = available_at


def out_of_attempts(task: Task) -> bool:
    """True when a failed attempt ends the task (no attempts left)."""
    return task.attempts >= task.max_attempts


def interrupt(task: Task) -> None:
    """``running -> queued`` at shutdown: not the task's fault, the attempt is handed back."""
    task.state = QUEUED
    task.attempts = max(0, task.attempts - 1)
    task.started_at = None


def make_due(task: Task) -> TaskState:
    """``waiting | retrying -> queued`` when due; returns the state it left."""
    previous = task.state
    task.state = QUEUED
    return previous


def recovered_state(attempts: int, max_attempts: int) -> TaskState:
    """Where a task a dead process left ``running`` goes: back to ``queued``, or
    ``failed`` when the attempt it was on was its last (it was counted at start)."""
    return FAILED if attempts >= max_attempts else QUEUED
