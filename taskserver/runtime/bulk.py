"""Bulk actions: retry, cancel or purge a selection of tasks, or every task a filter
matches, a page at a time.

A filter never loads everything: tasks are read ``PAGE`` at a time in id order and
each page is acted on (concurrently, so one commit carries a page's moves) before
the next is read; at most ``limit`` tasks per call, with a cursor to go on.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import Conflict, TaskNotFound, ValidationError
from ..lifecycle import TERMINAL, TERMINAL_ORDER
from ..models import Task, TaskState
from .control import Control
from .shared import Shared

Action = Literal["retry", "cancel", "purge"]
ACTIONS: tuple[Action, ...] = ("retry", "cancel", "purge")
#: Tasks read and acted on per round.
PAGE = 500
#: Per-task errors reported at most (the count of failures is always exact).
MAX_ERRORS = 100


@dataclass(frozen=True, slots=True)
class Where:
    """A filter: every field given must match exactly."""

    state: TaskState | None = None
    queue: str | None = None
    name: str | None = None


@dataclass(slots=True)
class BulkResult:
    """What one bulk call did: tasks looked at, acted on, and why the others were not."""

    action: Action
    matched: int = 0
    done: int = 0
    #: ``id -> why not`` for up to ``MAX_ERRORS`` tasks
    errors: dict[int, str] = field(default_factory=dict)
    #: a filter call that stopped at its ``limit``: the cursor to call again with
    next_after: int | None = None

    def to_json(self) -> dict[str, object]:
        """The JSON body of ``POST /tasks:bulk``."""
        return {
            "action": self.action,
            "matched": self.matched,
            "done": self.done,
            "errors": {str(k): v for k, v in self.errors.items()},
            "next_after": self.next_after,
        }

    def refuse(self, task_id: int, why: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors[task_id] = why


class Bulk:
    """``by_ids`` and ``by_filter``, on the server's ``Control``."""

    def __init__(self, shared: Shared, control: Control) -> None:
        self._s = shared
        self._control = control

    async def by_ids(self, action: Action, ids: list[int]) -> BulkResult:
        """Act on each of ``ids`` (each at most once)."""
        result = BulkResult(action)
        unique = list(dict.fromkeys(ids))
        result.matched = len(unique)
        await self._act(action, unique, result)
        return result

    async def by_filter(
        self, action: Action, where: Where, *, limit: int, after: int = 0
    ) -> BulkResult:
        """Act on up to ``limit`` tasks ``where`` matches with ids above ``after``."""
        if action == "purge" and where.state is not None and where.state not in TERMINAL:
            raise ValidationError("purge deletes ended tasks only", field="filter.state")
        result = BulkResult(action)
        await self._s.store.caught_up()  # the rows show every change the counts do
        cursor = after
        while result.matched < limit:
            want = min(PAGE, limit - result.matched)
            page = await self._s.store.list_tasks(
                state=where.state, queue=where.queue, name=where.name, after=cursor, limit=want
            )
            if not page:
                return result
            result.matched += len(page)
            cursor = page[-1].id
            await self._act(action, [t.id for t in page], result, page)
            if len(page) < want:
                return result
        result.next_after = cursor
        return result

    async def _act(
        self, action: Action, ids: list[int], result: BulkResult, known: list[Task] | None = None
    ) -> None:
        for start in range(0, len(ids), PAGE):
            chunk = ids[start : start + PAGE]
            if action == "purge":
                await self._purge(chunk, result, known)
                continue
            act = self._control.retry if action == "retry" else self._control.cancel
            outcomes = await asyncio.gather(*(act(i) for i in chunk), return_exceptions=True)
            for task_id, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, Conflict | TaskNotFound):
                    result.refuse(task_id, str(outcome))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    result.done += 1

    async def _purge(self, ids: list[int], result: BulkResult, known: list[Task] | None) -> None:
        # One ended state at a time, so the in-memory counts stay exact (as Control.purge).
        states = TERMINAL_ORDER
        if known is not None:
            found = {t.state for t in known}
            states = tuple(s for s in TERMINAL_ORDER if s in found)
        deleted = 0
        for state in states:
            n = await self._s.store.purge((state,), math.inf, chunk=len(ids), ids=ids)
            self._s.counts.purged(state, n)
            deleted += n
        result.done += deleted
        if deleted < len(ids):  # the rest had not ended, or did not exist
            left = await asyncio.gather(*(self._s.store.get_task(i) for i in ids))
            for task in left:
                if task is not None:
                    result.refuse(task.id, f"task {task.id} is {task.state.value}; not ended")


def check_action(value: object) -> Action:
    """``value`` as an action, or ``ValidationError`` naming ``action``."""
    for action in ACTIONS:
        if value == action:
            return action
    raise ValidationError(f"action must be one of {', '.join(ACTIONS)}", field="action")
