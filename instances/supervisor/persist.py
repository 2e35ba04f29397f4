"""The supervisor's own database threads, and the ordered write-behind outbox.

No lifecycle step waits on the database: a transition changes memory, then queues its
write here. The database only mirrors what the supervisor knows (its children are in
the pid files of recovery.py), so an outage delays the mirror, never a tenant.

Why threads of our own: asgiref's single sync thread is shared with routing reloads,
log flushes and the dashboard; one 20 s SQLite busy wait there would hold up every
lifecycle write, and at exit a thread stuck there is joined. Ours are daemon threads,
each with its own Django connection, and nobody joins them.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connection

log = logging.getLogger("tenement.supervisor")

T = TypeVar("T")
RETRY_FIRST, RETRY_MAX = 0.1, 2.0  # seconds between attempts at a write the database refused


def _close_connection() -> None:
    """Drop this thread's connection after an error: the next call opens a fresh one
    (a restarted PostgreSQL has closed the old one under us)."""
    with contextlib.suppress(Exception):
        connection.close()


class DbThread:
    """One daemon thread with its own database connection, running calls in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self.jobs = collections.deque()
        self.has_job = threading.Event()
        self.closing = False
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn(*args, **kwargs) on this thread; a cancelled caller does not wait."""
        if self.closing:
            raise RuntimeError(f"{self.name} is closed")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.jobs.append((functools.partial(fn, *args, **kwargs), future))
        self.has_job.set()
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Finish the calls queued so far, close the connection, end the thread."""
        self.closing = True
        self.has_job.set()

    def _work(self) -> None:
        while not (self.closing and not self.jobs):
            self.has_job.wait()
            self.has_job.clear()
            while self.jobs:
                fn, future = self.jobs.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn())
                except BaseException as e:
                    if isinstance(e, DatabaseError):
                        _close_connection()
                    future.set_exception(e)
        _close_connection()


class Outbox:
    """Writes applied in the order they were queued, each retried until it lands.

    A transient error (locked, unreachable) retries the head write with backoff, so a
    later write never overtakes an earlier one; any other database error is a bug in
    that write: it is logged and dropped rather than block the mirror for ever.
    """

    def __init__(self, name: str = "tenement-db-outbox") -> None:
        self.pending: collections.deque[tuple[str, Callable[[], Any]]] = collections.deque()
        self.lock = threading.Lock()
        self.has_work = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.failing_since: float | None = None
        self.written = 0
        self.closing = False
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def put(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue a write; never blocks and never raises for the database's sake."""
        with self.lock:
            self.pending.append((what, functools.partial(fn, *args, **kwargs)))
            self.idle.clear()
        self.has_work.set()

    def __len__(self) -> int:
        return len(self.pending)

    async def flush(self, timeout: float, cap: float | None = None) -> bool:
        """Wait until every queued write has landed; False if some have not. Gives up
        after `timeout` seconds without progress (a stuck database), or after `cap`
        seconds in all (a long queue that is moving)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (timeout if cap is None else max(cap, timeout))
        while not self.idle.is_set():
            written = self.written
            left = min(timeout, give_up - loop.time())
            if left <= 0:
                return False
            if not await loop.run_in_executor(None, self.idle.wait, left):
                if self.written == written:
                    return False  # no progress: the database is not taking writes
        return True

    def close(self) -> None:
        """After a flush: end the thread once the queue is empty, or at once if the
        database refuses (what is left, the next start corrects)."""
        self.closing = True
        self.has_work.set()

    def _work(self) -> None:
        try:
            while not (self.closing and not self.pending):
                self.has_work.wait()
                self.has_work.clear()
                while self.pending:
                    what, write = self.pending[0]
                    if not self._apply(what, write):
                        return  # closing, and the database refuses: leave the rest
                    with self.lock:
                        self.pending.popleft()
                        if not self.pending:
                            self.idle.set()
        finally:
            _close_connection()

    def _apply(self, what: str, write: Callable[[], Any]) -> bool:
        """Apply one write, retrying while the database refuses; False if we are closing
        meanwhile (the write is left undone)."""
        delay = RETRY_FIRST
        while True:
            try:
                write()
            except (OperationalError, InterfaceError) as e:
                _close_connection()
                self._note_failure(what, e)
                if self.closing:
                    return False
                time.sleep(delay)  # this thread's own backoff; nothing else waits on it
                delay = min(delay * 2, RETRY_MAX)
                continue
            except DatabaseError as e:
                _close_connection()
                log.error(
                    "database mirror: dropping write %r: %s",
                    what,
                    e,
                    extra={"event": "mirror_dropped", "during": what},
                )
            self.written += 1
            self._note_recovery()
            return True

    def _note_failure(self, what: str, error: Exception) -> None:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            log.warning(
                "database mirror behind (%s: %s); %d writes queued, retrying",
                what,
                error,
                len(self.pending),
                extra={"event": "mirror_behind", "during": what, "queued": len(self.pending)},
            )

    def _note_recovery(self) -> None:
        if self.failing_since is not None:
            behind = time.monotonic() - self.failing_since
            self.failing_since = None
            log.info(
                "database mirror caught up after %.1fs",
                behind,
                extra={"event": "mirror_caught_up", "behind_s": round(behind, 3)},
            )
