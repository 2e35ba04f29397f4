"""The supervisor's own record of its children, and the clean-up after a crash.

Every child's pid and start time go to a small file under {data dir}/run/pids, fsynced,
before anything else happens to that child: not the database, which may be locked,
full or down. After a crash (kill -9, power loss, a full disk) the next supervisor reads
these files and stops every child still alive, so there is never an orphan, nor a second
copy of a tenant next to the one nobody recorded.

Each file is reserved at a fixed size before the spawn and then overwritten in place:
recording a pid needs no new disk blocks, so a full disk refuses the start (clearly)
rather than let a child run unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from instances.models import Instance
from instances.supervisor import process, store

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

log = logging.getLogger("tenement.supervisor")

RECORD_SIZE = 512  # bytes; a record is padded to this so rewrites never grow the file
BLANK = b" " * RECORD_SIZE


@dataclass(frozen=True)
class ChildRecord:
    pk: int
    key: str
    pid: int
    start_ticks: float
    stop_timeout: float


class PidFiles:
    """One fixed-size file per instance (by primary key) holding its live child, if any."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, pk: int) -> Path:
        return self.folder / f"{pk}.pid"

    def reserve(self, pk: int) -> None:
        """Make sure the file exists at full size; OSError (e.g. ENOSPC) if it cannot."""
        path = self.path(pk)
        if path.exists() and path.stat().st_size == RECORD_SIZE:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, BLANK, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._sync_folder()

    def record(self, child: ChildRecord) -> None:
        """Write the child's record in place, durably. Raises OSError if it cannot."""
        data = json.dumps(child.__dict__).encode()
        self._overwrite(child.pk, data.ljust(RECORD_SIZE))

    def clear(self, pk: int) -> None:
        """The child is gone (reaped): blank the record, keeping the file's blocks."""
        with contextlib.suppress(FileNotFoundError):
            self._overwrite(pk, BLANK)

    def remove(self, pk: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(pk).unlink()

    def children(self) -> list[ChildRecord]:
        """Every recorded child; unreadable or blank files are skipped."""
        found = []
        for path in sorted(self.folder.glob("*.pid")):
            try:
                raw = path.read_bytes().strip()
                if raw:
                    found.append(ChildRecord(**json.loads(raw)))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable pid file %s: %s", path, e)
        return found

    def _overwrite(self, pk: int, data: bytes) -> None:
        fd = os.open(self.path(pk), os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_folder(self) -> None:
        # A new file's directory entry must be durable too, or a crash loses the file.
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Recovery:
    """Supervisor mixin: on start, stop whatever a previous supervisor left running."""

    async def recover(self: Supervisor) -> int:
        """Kill the children a previous supervisor left, from the pid files first, then
        from database rows an older version recorded. Returns how many were killed."""
        children = self.pidfiles.children()
        killed = await asyncio.gather(*(self.recover_child(c) for c in children))
        for child in children:
            self.pidfiles.clear(child.pk)
        rows = await self.read(store.leftovers)
        known = {c.pid for c in children}
        killed += await asyncio.gather(
            *(self.recover_row(row) for row in rows if row.pid not in known)
        )
        for row in rows:  # the mirror says what we know now: nothing is running
            self.outbox.put("recover", store.settle_leftover, row.pk, row.state)
        return sum(killed)

    async def recover_child(self: Supervisor, child: ChildRecord) -> int:
        # The pid alone is not proof (it may have been reused): the start time must match.
        if not process.is_our_orphan(child.pid, child.start_ticks):
            return 0
        log.warning(
            "%s: killing pid %s left by a previous supervisor",
            child.key,
            child.pid,
            extra={"event": "orphan_killed", "instance": child.key, "pid": child.pid},
        )
        await process.kill_orphan(child.pid, child.stop_timeout)
        self.outbox.put("recover", store.record_event, child.pk, "recovered", _killed(child.pid))
        return 1

    async def recover_row(self: Supervisor, row: Instance) -> int:
        if not (row.pid and process.is_our_orphan(row.pid, row.pid_create_time)):
            return 0
        log.warning(
            "%s: killing pid %s left by a previous supervisor",
            row,
            row.pid,
            extra={"event": "orphan_killed", "instance": row.key, "pid": row.pid},
        )
        await process.kill_orphan(row.pid, row.service.stop_timeout)
        self.outbox.put("recover", store.record_event, row.pk, "recovered", _killed(row.pid))
        return 1


def _killed(pid: int) -> str:
    return f"killed leftover pid {pid}"
