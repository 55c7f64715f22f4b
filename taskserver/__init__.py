"""taskserver: HTTP, durable in-process task workers and Server-Sent Events in one process."""

from .client import Client, ServerEvent, SyncClient
from .config import Settings, load_settings
from .credentials import ApiToken
from .errors import (
    AccessDenied,
    ConfigError,
    Conflict,
    NotSerializable,
    PermanentError,
    RetryLater,
    ServerBusy,
    ServerClosed,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TaskNotFound,
    TaskOutcomeError,
    TaskServerError,
    ValidationError,
    WorkerCrashed,
)
from .lifecycle import ACTIVE, TERMINAL
from .models import Event, EventType, RetryPolicy, Task, TaskState
from .problems import problem
from .runtime.context import ProcessTaskContext, SyncTaskContext, TaskContext
from .runtime.options import TaskSpec
from .server import Submitted, TaskServer
from .web.app import TASKSERVER, attach, create_app

__version__ = "0.1.0"

__all__ = [
    "ACTIVE",
    "TASKSERVER",
    "TERMINAL",
    "AccessDenied",
    "ApiToken",
    "Client",
    "ConfigError",
    "Conflict",
    "Event",
    "EventType",
    "NotSerializable",
    "PermanentError",
    "ProcessTaskContext",
    "RetryLater",
    "RetryPolicy",
    "ServerBusy",
    "ServerClosed",
    "ServerEvent",
    "Settings",
    "Submitted",
    "SyncClient",
    "SyncTaskContext",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskNotFound",
    "TaskOutcomeError",
    "TaskServer",
    "TaskServerError",
    "TaskSpec",
    "TaskState",
    "ValidationError",
    "WorkerCrashed",
    "attach",
    "create_app",
    "load_settings",
    "problem",
]
