"""taskserver: HTTP, durable in-process task workers and Server-Sent Events in one process."""

from .app import TASKSERVER, attach, create_app
from .config import Settings, load_settings
from .errors import (
    ConfigError,
    Conflict,
    NotSerializable,
    PermanentError,
    ServerBusy,
    ServerClosed,
    TaskError,
    TaskNotFound,
    TaskServerError,
    ValidationError,
)
from .models import ACTIVE, TERMINAL, Event, EventType, Task, TaskState
from .server import TaskServer
from .workers import ProcessTaskContext, SyncTaskContext, TaskContext

__version__ = "0.1.0"

__all__ = [
    "ACTIVE",
    "TASKSERVER",
    "TERMINAL",
    "ConfigError",
    "Conflict",
    "Event",
    "EventType",
    "NotSerializable",
    "PermanentError",
    "ProcessTaskContext",
    "ServerBusy",
    "ServerClosed",
    "Settings",
    "SyncTaskContext",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskNotFound",
    "TaskServer",
    "TaskServerError",
    "TaskState",
    "ValidationError",
    "attach",
    "create_app",
    "load_settings",
]
