"""Every error taskserver raises on purpose derives from one root.

    TaskServerError
    ├── ConfigError          settings or setup are wrong; the CLI exits 2
    ├── ValidationError      a caller sent bad input (HTTP 4xx); names the field
    │   └── NotSerializable  a payload or result cannot be encoded as JSON
    ├── TaskNotFound         no task has that id (HTTP 404)
    ├── Conflict             the task is not in a state that allows it (HTTP 409)
    ├── AccessDenied         no valid credential (HTTP 401) or not allowed (HTTP 403)
    ├── ServerBusy           a bounded buffer is full (HTTP 503 with Retry-After)
    │   └── ServerClosed     the server is stopping and takes no new work
    ├── TaskError            raised *by a task callback* to steer the outcome
    │   ├── PermanentError   fail now, whatever attempts remain
    │   └── RetryLater       wait ``delay`` seconds, without counting an attempt
    ├── WorkerCrashed        the process running a cpu_bound task died
    └── TaskOutcomeError     ``task_wait`` / ``wait`` saw a task end badly
        ├── TaskFailed       it failed (``error`` holds its error)
        └── TaskCancelled    it was cancelled

``TaskError`` is the only branch meant to be raised by application code.
"""

from __future__ import annotations


class TaskServerError(Exception):
    """Root of every deliberate taskserver error."""


class ConfigError(TaskServerError):
    """A setting or the application setup is wrong; the message says what to fix."""


class ValidationError(TaskServerError):
    """Bad input from a caller. ``field`` names the offending field, if one does."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotSerializable(ValidationError):
    """A task payload or result cannot be encoded as JSON; nothing was written."""


class TaskNotFound(TaskServerError):
    """No task has the requested id."""

    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} does not exist")
        self.task_id = task_id


class Conflict(TaskServerError):
    """The task exists but its state does not allow the operation."""


class AccessDenied(TaskServerError):
    """The request lacks a valid credential (``status`` 401) or the right (403).

    An authorizer (``server.authorize``) may raise it to choose the status and message.
    ``challenge`` is the ``WWW-Authenticate`` header value sent with it.
    """

    def __init__(self, message: str, *, status: int = 403, challenge: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.challenge = challenge


class ServerBusy(TaskServerError):
    """A bounded buffer is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerClosed(ServerBusy):
    """The server is stopping and accepts no new tasks."""


class TaskError(TaskServerError):
    """Base for exceptions a task callback raises to steer its outcome."""


class PermanentError(TaskError):
    """Raised by a task callback: fail the task now, do not retry it."""


class RetryLater(TaskError):
    """Raised by a task callback: run again after ``delay`` seconds; no attempt is counted.

    The task is ``waiting`` meanwhile (and holds its serial group).
    """

    def __init__(self, delay: float, message: str = "") -> None:
        super().__init__(message or f"retry in {delay:g}s")
        self.delay = max(0.0, float(delay))


class WorkerCrashed(TaskServerError):
    """The process running a cpu_bound task died (the task may be retried)."""


class TaskOutcomeError(TaskServerError):
    """A waited-for task ended without a result."""

    def __init__(self, task_id: int, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskFailed(TaskOutcomeError):
    """The waited-for task failed; ``error`` is its recorded error."""

    def __init__(self, task_id: int, error: str | None) -> None:
        super().__init__(task_id, f"task {task_id} failed: {error}")
        self.error = error


class TaskCancelled(TaskOutcomeError):
    """The waited-for task was cancelled."""

    def __init__(self, task_id: int) -> None:
        super().__init__(task_id, f"task {task_id} was cancelled")
