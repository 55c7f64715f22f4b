"""The attempts journal: a start marker per attempt that outlives the process.

A worker's ``started`` state reaches the database with the next group commit,
a millisecond or so after its callback began. A callback that kills the process
inside that window (``os.kill``, a crash in a C extension, the OOM killer) left no
trace of its attempt: the task ran again as the same attempt, and one that always
killed the process crash-looped forever instead of ending ``failed``.

So before the callback runs, the store writes one record (task id, attempt, the
id of its ``started`` event) into a file beside the database, ``<db>-attempts``,
mapped into memory (``MAP_SHARED``): a store into the page cache, no system call
and no ``fsync``. The page cache outlives the process, as the SQLite WAL does
under ``synchronous=NORMAL``; awaiting a commit per task instead would cap
throughput at workers ÷ commit latency. At open the store folds the starts whose
``started`` event never committed into their tasks' attempts, then the journal
starts empty.

The file is a row of *segments* used in turn, so it stays bounded under any
load: when the active segment is full, records go to a free one, and the full
one is zeroed and freed as soon as the batch holding its last start has
committed (everything in it is in the database by then). Only when commits stop
(a failing disk) does the file grow, one segment at a time. Its blocks are
written (with zeros) before they are mapped, so a full disk refuses to grow it
with an error, never with a ``SIGBUS`` on a store.

A record carries a check field; a record the process died while writing (all
or part of it still zero) fails the check or names task, attempt or event 0, and
counts for nothing: its callback had not started.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

#: task id, attempt, started event id, check (the three xor ``_MAGIC``)
_RECORD = struct.Struct("<QQQQ")
#: High bits set: no xor of real ids and attempts comes near it, so zeros never pass.
_MAGIC = 0x7A5C_3E91_D04B_1F26
#: Records per segment (1 MiB): one zeroing of 1 MiB every 32,768 starts.
SEGMENT_RECORDS = 32_768
#: Segments in a new file: one being written while the other waits for its commit.
_INITIAL_SEGMENTS = 2
#: Zeros to write segments with, in pieces: one megabyte buffer per store, freed
#: at close, fragmented the heap (+30 MB of RSS over the test suite's servers).
_ZEROS = bytes(1 << 16)


class AttemptJournal:
    """Start markers for the tasks of one database file, in a memory-mapped file.

    ``lock``, ``read`` and ``open`` run once, at start, before anything is written;
    ``started`` and ``retire`` then run on the event loop's thread.
    """

    def __init__(self, db_path: str, *, segment_records: int = SEGMENT_RECORDS) -> None:
        self.path = f"{db_path}-attempts"
        self._segment = segment_records * _RECORD.size
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._segments = 0
        self._active = 0
        self._pos = 0  # byte offset of the next record
        self._end = 0  # end of the active segment
        self._free: list[int] = []
        #: Starts that could not be recorded (the file could not grow): they count at commit.
        self.lost = 0
        self._stuck = False  # a failure to grow was logged
        # Untyped: started() reaches it only with a map (closed, _pos == _end == 0).
        self._pack: Callable[..., None] = _RECORD.pack_into

    def __repr__(self) -> str:
        state = "open" if self._map is not None else "closed"
        used = self._segments - len(self._free)
        return f"<AttemptJournal {self.path!r} {state} segments={used}/{self._segments}>"

    def lock(self) -> bool:
        """Open the file (created if missing) and lock it for this process.

        ``False`` when another store holds it: a second server on the same
        database must neither fold in nor overwrite the starts of a live one.
        """
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # its owner removed it as we opened it: take the new one
        return False

    def read(self) -> Iterator[tuple[int, int, int]]:
        """Every valid ``(task_id, attempt, event_id)`` in the locked file, in no order."""
        chunks = []
        offset = 0
        while chunk := os.pread(self._fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
        data = b"".join(chunks)
        data = data[: len(data) - len(data) % _RECORD.size]
        for task_id, attempt, event_id, check in _RECORD.iter_unpack(data):
            if check == task_id ^ attempt ^ event_id ^ _MAGIC and task_id and attempt and event_id:
                yield task_id, attempt, event_id

    def open(self) -> None:
        """Empty the locked file (what it held has been recovered) and map it."""
        os.ftruncate(self._fd, 0)
        self._segments = 0
        for _ in range(_INITIAL_SEGMENTS):
            self._add_segment()
        self._map = mmap.mmap(self._fd, self._segments * self._segment)
        self._free = list(range(self._segments - 1, 0, -1))
        self._use(0)

    def _add_segment(self) -> int:
        # Written, not just sized: a hole would be allocated on the first store
        # into it, and a full disk would then kill the process with SIGBUS.
        start = self._segments * self._segment
        for offset in range(start, start + self._segment, len(_ZEROS)):
            size = min(len(_ZEROS), start + self._segment - offset)
            if os.pwrite(self._fd, memoryview(_ZEROS)[:size], offset) < size:
                raise OSError(errno.ENOSPC, "short write")
        self._segments += 1
        return self._segments - 1

    def _use(self, segment: int) -> None:
        self._active = segment
        self._pos = segment * self._segment
        self._end = self._pos + self._segment

    def started(self, task_id: int, attempt: int, event_id: int) -> int | None:
        """Record that ``attempt`` of ``task_id`` starts, its ``started`` event being
        ``event_id``; once this returns, the attempt survives the process dying.

        Returns a segment to ``retire`` once the batch holding this start has
        committed (the active one just filled up), else ``None``.
        """
        if self._pos == self._end:
            full = self._switch()
            if full is None:
                self.lost += 1
                return None
        else:
            full = None
        self._pack(
            self._map, self._pos, task_id, attempt, event_id, task_id ^ attempt ^ event_id ^ _MAGIC
        )
        self._pos += _RECORD.size
        return full

    def _switch(self) -> int | None:
        if self._map is None:
            return None
        if self._free:
            segment = self._free.pop()
        else:  # commits have stalled: grow rather than overwrite starts not yet committed
            try:
                segment = self._add_segment()
                self._map.resize(self._segments * self._segment)
            except OSError as exc:
                if not self._stuck:
                    self._stuck = True
                    log.error(
                        "attempts journal %s cannot grow: %s; attempts count at commit",
                        self.path,
                        exc,
                    )
                return None
            self._stuck = False
            log.warning("attempts journal %s grew to %d segments", self.path, self._segments)
        full = self._active
        self._use(segment)
        return full

    def retire(self, segment: int) -> None:
        """Zero and free ``segment``: every start in it has committed."""
        if self._map is None:
            return
        start = segment * self._segment
        for offset in range(start, start + self._segment, len(_ZEROS)):
            size = min(len(_ZEROS), start + self._segment - offset)
            self._map[offset : offset + size] = memoryview(_ZEROS)[:size]
        self._free.append(segment)

    def close(self) -> None:
        """Unmap and remove the file (every start in it has committed), then unlock it."""
        if self._map is not None:
            self._map.close()
            self._map = None
            self._pos = self._end = 0
            os.remove(self.path)  # while locked: no other store has it open for use
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
