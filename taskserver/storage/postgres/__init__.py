"""The PostgreSQL backend: a database shared by every taskserver of a cluster."""

from .backend import PostgresBackend
from .node import redact

__all__ = ["PostgresBackend", "redact"]
