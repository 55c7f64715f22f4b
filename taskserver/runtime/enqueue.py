"""Enqueue: options resolved, unique keys looked after, new tasks appended to storage.

``submit``, ``task`` and ``task_many`` of ``TaskServer`` are these. A plain task
(no options) takes the fast path: its defaults are resolved once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import lifecycle
from ..errors import ServerBusy, ServerClosed, ValidationError
from ..models import Task, TaskState
from ..storage import NewTask, Store
from .options import Defaults, TaskSpec, encode_parsed, encode_payload, prepare
from .shared import Shared

#: Reads of a key's recent success at most, while tasks keep ending during the read.
LOOKUPS = 5


@dataclass(frozen=True, slots=True)
class Submitted:
    """What ``submit`` did: the task id, and whether a unique key matched an existing task."""

    id: int
    existing: bool = False
    #: the state it was stored in: ``queued``, or ``waiting`` for a delayed task
    #: (``None`` for an existing task: ask ``get()``)
    state: TaskState | None = None
    #: the topic its events are published on (the Mercure hub, ``/events``)
    topic: str = ""


class Enqueue:
    """Turns data and options into new tasks in the current batch, all validated first."""

    def __init__(self, shared: Shared) -> None:
        self._s = shared
        self.queue_defaults: dict[str, Defaults] = {}
        self.name_defaults: dict[str, Defaults] = {}
        #: a task with no options, resolved once (``_prepare``'s fast path)
        self._plain: NewTask | None = None

    def defaults_changed(self) -> None:
        """Queue or name defaults changed: resolve the plain options again."""
        self._plain = None

    def admit(self, count: int) -> Store:
        if self._s.closing or not self._s.started:
            raise ServerClosed("the server is not accepting tasks (stopping or not started)")
        limit = self._s.settings.max_queued
        if count > limit:
            # Waiting cannot help: not even an empty queue takes it (a 503 would be retried).
            raise ValidationError(
                f"{count} new tasks in one batch can never fit: max_queued is {limit}",
                field="tasks",
            )
        counts = self._s.counts.totals  # lifecycle.BACKLOG, unrolled: this runs per task
        active = counts[lifecycle.QUEUED] + counts[lifecycle.WAITING]
        if active + count > limit:
            raise ServerBusy(
                f"{active} tasks are waiting to run, the limit is {self._s.settings.max_queued}",
                retry_after=5.0,
            )
        return self._s.store

    def _prepare(self, spec: TaskSpec, where: str = "") -> NewTask:
        if not spec.options:
            # The common case: no options. The defaults are resolved once; only the data
            # is encoded.
            text, value = encode_payload(spec.data, f"{where}data")
            p = self._plain_options()
            return NewTask(
                text,
                value,
                p.max_attempts,
                p.timeout,
                p.queue,
                p.priority,
                None,
                None,
                None,
                None,
                p.retry,
                None,
            )
        return self.resolve(spec, where)

    def _plain_options(self) -> NewTask:
        """The options of a task given none, resolved once (``text``/``data`` unused)."""
        if self._plain is None:
            self._plain = self.resolve(TaskSpec(None), "")
        return self._plain

    def resolve(self, spec: TaskSpec, where: str) -> NewTask:
        # Only a str can name defaults: a list (bad input, refused by prepare) is unhashable.
        name = spec.options.get("name")
        name_defaults = self.name_defaults.get(name) if isinstance(name, str) else None
        queue = spec.options.get("queue") or (name_defaults.queue if name_defaults else None)
        return prepare(
            spec,
            where=where,
            now=self._s.clock(),
            settings=self._s.settings,
            by_name=name_defaults,
            by_queue=self.queue_defaults.get(queue if isinstance(queue, str) else "default"),
        )

    async def submit(self, data: Any, **options: Any) -> Submitted:
        """``TaskServer.submit``: one task, with the options documented there."""
        if "unique_key" in options or "serial_group" in options:
            return (await self.insert([TaskSpec(data, options)]))[0]
        task, committed = self._append_one(data, options)
        # As stored: once committed a worker may take the task before this resumes.
        submitted = Submitted(task.id, state=task.state, topic=self._s.topic(task.id))
        await committed
        return submitted

    async def submit_parsed(
        self, data: Any, options: dict[str, Any]
    ) -> tuple[int, TaskState | None, bool]:
        """``submit`` of ``data`` parsed from JSON just now and held by nobody else (the
        HTTP API's body): stored, and handed to the worker, as it is (not decoded back
        from its text). ``options`` is taken as given. Answers ``(id, state, existing)``
        as ``Submitted`` would, without one: this runs per request."""
        if "unique_key" in options or "serial_group" in options:
            submitted = (await self.insert([TaskSpec(data, options)]))[0]
            return submitted.id, submitted.state, submitted.existing
        task, committed = self._append_one(data, options, parsed=True)
        state = task.state  # as stored (see submit)
        await committed
        return task.id, state, False

    async def task(self, data: Any, **options: Any) -> int:
        """Enqueue one task and return its id once it is durable. Options as ``submit``."""
        if "unique_key" in options or "serial_group" in options:
            return (await self.submit(data, **options)).id
        task, committed = self._append_one(data, options)
        await committed
        return task.id

    def _append_one(
        self, data: Any, options: dict[str, Any], *, parsed: bool = False
    ) -> tuple[Task, asyncio.Future[None]]:
        # The hot path: one task, no uniqueness or group to look after. Everything is
        # validated before anything is appended. ``parsed``: see ``submit_parsed``.
        if options:
            item = self.resolve(TaskSpec(data, options), "")
            text, data = item.text, item.data
        elif parsed:
            item = self._plain_options()
            text = encode_parsed(data)
        else:
            item = self._plain_options()
            text, data = encode_payload(data)
        task, committed = self.admit(1).insert_task(item, text, data)
        self._s.counts.add(task.queue, task.state)
        if task.state is lifecycle.QUEUED:
            self._s.tally.queued(task)
        return task, committed

    async def task_many(self, items: Iterable[Any], **options: Any) -> list[Submitted]:
        """``TaskServer.task_many``: all or none, every item validated first."""
        specs = [
            item.with_defaults(options)
            if isinstance(item, TaskSpec)
            else TaskSpec(item, dict(options))
            for item in items
        ]
        if not specs:
            raise ValidationError("no tasks given", field="tasks")
        return await self.insert(specs, batch=True)

    async def insert(
        self,
        specs: Sequence[TaskSpec],
        *,
        batch: bool = False,
        schedule: tuple[str, float] | None = None,
    ) -> list[Submitted]:
        prepared = [
            self._prepare(spec, f"tasks[{i}]." if batch else "") for i, spec in enumerate(specs)
        ]
        if any(item.unique_for for item in prepared):
            # Looking up recent tasks awaits the disk: two callers with the same key
            # must not both miss, so such look-ups and their appends take turns.
            async with self._s.unique.lock:
                results, commits = await self._append(prepared, schedule)
        else:
            results, commits = await self._append(prepared, schedule)
        for committed in commits:
            await committed
        if self._s.store.shared:
            return self._settle(results, commits)
        return results

    def _settle(
        self, results: list[Submitted], commits: list[asyncio.Future[None]]
    ) -> list[Submitted]:
        """On a shared database, another server may hold a unique key (or have enqueued a
        periodic run) first: the database kept those new tasks out; answer with the
        holder, as for a key held here."""
        conflicts: dict[int, int | None] = {}
        for committed in commits:
            conflicts.update(getattr(committed, "conflicts", None) or {})
        if not conflicts:
            return results
        settled = []
        for result in results:
            if result.id not in conflicts:
                settled.append(result)
                continue
            if not result.existing:  # a new task of ours the database kept out: forget it
                self._s.unique.release(result.id)
                # Per state only: a shared database's per-queue counts are its own.
                state = lifecycle.QUEUED if result.state is None else result.state
                self._s.counts.totals[state] -= 1
            # An answer that named a kept-out task (a repeat of its key in this call, or a
            # caller that found it holding the key) names the holder instead.
            holder = conflicts[result.id]
            if holder is None:
                continue  # a periodic run another server enqueued
            if holder == 0:
                raise ServerBusy(
                    "a task with the same unique_key just ended; try again", retry_after=0.1
                )
            settled.append(Submitted(holder, existing=True, topic=self._s.topic(holder)))
        return settled

    async def _append(
        self, prepared: list[NewTask], schedule: tuple[str, float] | None
    ) -> tuple[list[Submitted], list[asyncio.Future[None]]]:
        """Resolve unique keys and append the new tasks; returns the answers and the
        commits to await: the new tasks' and those of existing tasks not yet durable."""
        results: list[Submitted | None] = [None] * len(prepared)
        commits: list[asyncio.Future[None]] = []
        fresh: list[NewTask] = []
        positions: list[int] = []  # where each fresh task's answer goes
        repeats: list[tuple[int, int]] = []  # (position, index in fresh): same key twice
        first_with_key: dict[str, int] = {}
        # Every disk read first; then the keys are resolved with no await in between,
        # so nobody can take a key after we looked.
        recent: dict[str, int | None] = {}
        unique = self._s.unique
        for item in prepared:
            if item.unique_key is not None and item.unique_for:
                since = self._s.clock() - item.unique_for
                for _ in range(LOOKUPS):
                    # A holder that ends while we read frees its key after its commit,
                    # which the read may not have seen: read again.
                    released = unique.released
                    found = await self._s.store.recent_unique(item.unique_key, since)
                    if unique.released == released:
                        break
                recent[item.unique_key] = found
        for i, item in enumerate(prepared):
            key = item.unique_key
            if key is not None:
                existing = self._s.unique.by_key.get(key)
                if existing is None and item.unique_for:
                    existing = recent.get(key)
                if existing is not None:
                    results[i] = Submitted(existing, existing=True, topic=self._s.topic(existing))
                    pending = self._s.unique.commits.get(existing)
                    if pending is not None and pending not in commits:
                        commits.append(pending)
                    continue
                if key in first_with_key:
                    repeats.append((i, first_with_key[key]))
                    continue
                first_with_key[key] = len(fresh)
            positions.append(i)
            fresh.append(item)
        if fresh:
            tasks, committed = self.admit(len(fresh)).insert_tasks(fresh, schedule=schedule)
            commits.append(committed)
            keyed: list[int] = []
            for task in tasks:
                self._s.counts.add(task.queue, task.state)
                if task.state is lifecycle.QUEUED:
                    self._s.tally.queued(task)
                if task.serial_group is not None:
                    self._s.ready.claim(task)
                if task.unique_key is not None:
                    self._s.unique.hold(task.unique_key, task.id)
                    self._s.unique.commits[task.id] = committed
                    keyed.append(task.id)
            if keyed:
                committed.add_done_callback(lambda _: self._durable(keyed))
            for position, task in zip(positions, tasks, strict=True):
                results[position] = Submitted(
                    task.id, state=task.state, topic=self._s.topic(task.id)
                )
            for position, index in repeats:
                results[position] = Submitted(
                    tasks[index].id, existing=True, topic=self._s.topic(tasks[index].id)
                )
        return [r for r in results if r is not None], commits

    def _durable(self, task_ids: list[int]) -> None:
        # Their batch is done (committed or failed): answers need not wait for it any more.
        for task_id in task_ids:
            self._s.unique.commits.pop(task_id, None)
