"""Log capture: app stdout/stderr, line by line, written to LogLine in batches."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.db import DatabaseError, transaction

from instances.models import Instance, LogLine
from instances.supervisor.persist import DbThread

log = logging.getLogger("tenement.logs")

# Longer lines keep their first 16 KiB and say how much was cut (like journald's cap).
MAX_LINE_BYTES = 16 * 1024
FLUSH_INTERVAL = 0.25
FLUSH_BATCH = 2000
# Past this many unwritten lines, new ones are dropped (and counted) rather than letting
# one runaway app fill memory and starve the database thread the supervisor needs. The
# budget is shared fairly: an instance loses lines only once it holds more than its share
# (this divided by the instances with lines waiting), so flooders drop their own lines and
# a quiet tenant keeps every one of its.
MAX_BUFFERED = 50_000


@dataclass(frozen=True)
class CapturedLine:
    instance_pk: int
    stream: str
    time: datetime
    text: str


class LogCollector:
    """Buffers lines from many readers; one bulk insert per flush, not one write per line."""

    def __init__(self, db: DbThread | None = None) -> None:
        # The supervisor's own thread: log writes never queue behind asgiref's.
        self.db = db or DbThread("tenement-db-logs")
        self.flushing = asyncio.Lock()
        self.buffer: list[CapturedLine] = []
        self.full = asyncio.Event()
        # Set while lines wait to be written: an idle supervisor's log loop sleeps on it
        # instead of waking four times a second to find nothing.
        self.has_lines = asyncio.Event()
        # Rows per instance since the last trim, so retention costs no COUNT per flush.
        self.stored: dict[int, int] = {}
        self.retention: dict[int, int] = {}
        self.dropped: dict[int, int] = {}
        # Unwritten lines per instance: the fair-share budget is counted against these.
        self.pending: dict[int, int] = {}

    async def capture(
        self,
        instance_pk: int,
        stream: str,
        reader: asyncio.StreamReader,
        counted: Callable[[], None] = lambda: None,
    ) -> None:
        """Read one pipe until EOF (the app exited or closed it), one row per line;
        `counted` is called once per line (tenement_log_lines_total)."""
        line, cut = bytearray(), 0
        while piece := await _read_piece(reader):
            room = MAX_LINE_BYTES - len(line)
            line += piece[:room]
            cut += max(0, len(piece) - room)
            if piece.endswith(b"\n"):
                cut -= 1 if len(piece) > room else 0  # the newline is not content
                self.add(instance_pk, stream, _text(line, cut))
                counted()
                line, cut = bytearray(), 0
        if line:
            self.add(instance_pk, stream, _text(line, cut))
            counted()

    def add(self, instance_pk: int, stream: str, text: str) -> None:
        held = self.pending.get(instance_pk, 0)
        if len(self.buffer) >= MAX_BUFFERED and held >= self.fair_share():
            self.dropped[instance_pk] = self.dropped.get(instance_pk, 0) + 1
            self.full.set()
            return
        self.pending[instance_pk] = held + 1
        self.buffer.append(CapturedLine(instance_pk, stream, datetime.now(UTC), text))
        self.has_lines.set()
        if len(self.buffer) >= FLUSH_BATCH:
            self.full.set()

    async def flush(self) -> bool:
        """Write what is buffered and apply retention. Returns whether anything was written.

        One flush at a time: when it returns, every line captured before the call is
        written, including those a concurrent flush (the loop's) had already taken."""
        async with self.flushing:
            return await self.flush_now()

    async def flush_now(self) -> bool:
        self.full.clear()
        for pk, n in self.dropped.items():
            log.warning("instance %s: dropped %d log lines (logging faster than stored)", pk, n)
        self.dropped.clear()
        if not self.buffer:
            return False
        batch, self.buffer = self.buffer, []
        self.has_lines.clear()
        self.pending.clear()
        try:
            await self.db.call(self._write, batch)
        except DatabaseError:
            self.requeue(batch)
            raise
        return True

    def requeue(self, batch: list[CapturedLine]) -> None:
        """A write the database refused keeps its lines for the next pass (an outage
        delays logs, like the rest of the mirror). Past MAX_BUFFERED the newest go, as in
        add(): the lines that explain how an outage began are the ones to keep."""
        lines = batch + self.buffer
        for c in lines[MAX_BUFFERED:]:
            self.dropped[c.instance_pk] = self.dropped.get(c.instance_pk, 0) + 1
        self.buffer = lines[:MAX_BUFFERED]
        self.has_lines.set()
        self.pending = dict(collections.Counter(c.instance_pk for c in self.buffer))

    def fair_share(self) -> int:
        """Each instance with lines waiting may hold this many (at least one batch)."""
        return max(FLUSH_BATCH, MAX_BUFFERED // max(1, len(self.pending)))

    def _write(self, batch: list[CapturedLine]) -> None:
        # All or nothing: a refused batch is written again later, and must not be doubled.
        stored = dict(self.stored)
        try:
            with transaction.atomic():
                self._write_rows(batch)
        except BaseException:
            self.stored = stored
            raise

    def _write_rows(self, batch: list[CapturedLine]) -> None:
        # Lines of an instance deregistered meanwhile have nowhere to go.
        live = set(
            Instance.objects.filter(pk__in={c.instance_pk for c in batch}).values_list(
                "pk", flat=True
            )
        )
        batch = [c for c in batch if c.instance_pk in live]
        rows = [
            LogLine(instance_id=c.instance_pk, stream=c.stream, time=c.time, text=c.text)
            for c in batch
        ]
        LogLine.objects.bulk_create(rows, batch_size=500)
        for pk in {c.instance_pk for c in batch} - self.stored.keys():
            # First sight since start-up: count what earlier runs left, once.
            self.stored[pk] = LogLine.objects.filter(instance_id=pk).count() - sum(
                1 for c in batch if c.instance_pk == pk
            )
        for c in batch:
            self.stored[c.instance_pk] = self.stored.get(c.instance_pk, 0) + 1
        for pk in {c.instance_pk for c in batch}:
            self._trim(pk)

    def _trim(self, instance_pk: int) -> None:
        keep = self.retention.get(instance_pk, 10_000)
        # Trim in steps of ~10% so retention is amortised, not a DELETE per flush.
        if self.stored[instance_pk] <= keep + max(1, keep // 10):
            return
        qs = LogLine.objects.filter(instance_id=instance_pk)
        cutoff = qs.order_by("-id").values_list("id", flat=True)[keep : keep + 1].first()
        if cutoff is not None:
            qs.filter(id__lte=cutoff).delete()
        self.stored[instance_pk] = qs.count()


def _text(line: bytes, cut: int) -> str:
    text = line.decode("utf-8", "replace").rstrip("\r\n").replace("\x00", "")
    return f"{text} [... {cut} more bytes truncated]" if cut else text


async def _read_piece(reader: asyncio.StreamReader) -> bytes:
    """The next line; a line longer than the buffer comes back in buffer-sized pieces."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        return e.partial  # end of output: the last, unterminated line (or b"")
    except asyncio.LimitOverrunError as e:
        # readline() would discard the buffer here; readuntil() leaves it for us to take.
        return await reader.read(max(e.consumed, 1))
