"""The SQLite backend: the only code that knows SQL or imports ``sqlite3``/``aiosqlite``."""

from .backend import SqliteBackend
from .snapshot import Snapshot, SnapshotError

__all__ = ["Snapshot", "SnapshotError", "SqliteBackend"]
