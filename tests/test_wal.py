"""The WAL stays bounded under writes that never pause.

SQLite starts a WAL over only once all of it has been copied into the database,
and a background checkpoint never catches up with a writer that never stops:
the file grew without end. Past ``wal_limit_pages`` the writer copies the rest
itself, right after a commit, and the WAL starts over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from taskserver.storage import NewTask, Store

#: Tasks written: each is two rows, so a WAL that never started over would hold
#: about 2 KB of frames per task, some 120 MB here.
WRITTEN = 60_000
#: Well under that, with room for a checkpointer slowed by a busy machine.
WAL_BOUND = 32 * 1024 * 1024


async def test_the_wal_starts_over_under_writes_that_never_pause(tmp_path: Path) -> None:
    db = str(tmp_path / "wal.db")
    wal = tmp_path / "wal.db-wal"
    store = Store(db, wal_limit_pages=64, checkpoint_interval=0.05)
    await store.open()
    try:
        item = NewTask('{"n":1}', {"n": 1}, 1, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        written = 0
        biggest = 0
        while written < WRITTEN or store.wal_restarts == 0:
            _, committed = store.insert_tasks([item] * 200)
            await committed
            written += 200
            biggest = max(biggest, wal.stat().st_size)  # a local file: no wait worth a thread
            assert loop.time() < deadline, "the WAL never started over"
    finally:
        await store.close()
    assert store.wal_restarts > 0
    # Between two restarts the WAL holds what was written since the last one: a few
    # checkpoint intervals' worth (more on a loaded machine), never all of it.
    assert biggest < WAL_BOUND, f"the WAL grew to {biggest:,} bytes"
