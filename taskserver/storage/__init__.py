"""Storage behind one contract: the ``Backend`` protocol (``backend.py``), the
backend-neutral group-commit ``Engine`` (``engine.py``), the intents a batch carries
(``intents.py``), and the backends (``sqlite/``). See ARCHITECTURE.md."""

from .backend import Backend, Opened
from .engine import Engine
from .intents import CommitFuture, Durable, NewTask, Signals
from .postgres import redact
from .sqlite import Snapshot, SnapshotError
from .store import Store, is_postgres

__all__ = [
    "Backend",
    "CommitFuture",
    "Durable",
    "Engine",
    "NewTask",
    "Opened",
    "Signals",
    "Snapshot",
    "SnapshotError",
    "Store",
    "is_postgres",
    "redact",
]
