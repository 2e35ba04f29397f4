"""File descriptors are the supervisor's resource, not a tenant's fault.

When this process runs out of them (EMFILE, or ENFILE for the whole system), a health
check or a spawn fails through no fault of the app. Such failures are recorded here,
logged, shown on /health and /status, and never count toward a tenant's max_restarts:
the supervisor defers instead of blaming (core.Supervisor.handle_failure).
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import Any

from proxy.limits import count_open_fds, fd_ceiling

log = logging.getLogger("tenement.supervisor")

EXHAUSTION = frozenset({errno.EMFILE, errno.ENFILE})
# A failure within this long after running out is not held against the tenant.
GRACE_S = 10.0
# While out of descriptors, a start is retried after this long (not counted).
RETRY_S = 1.0
LOG_EVERY_S = 5.0


def exhausted(exc: BaseException) -> bool:
    """Whether `exc` (or what it wraps) says this process or the system ran out of fds."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in EXHAUSTION:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


@dataclass
class Pressure:
    events: int = 0
    last_at: float | None = None  # time.time()
    last_where: str = ""
    _last_monotonic: float = -1e9
    _logged_at: float = -1e9

    def record(self, where: str, exc: BaseException) -> None:
        now = time.monotonic()
        self.events += 1
        self.last_at, self.last_where, self._last_monotonic = time.time(), where, now
        if now - self._logged_at >= LOG_EVERY_S:  # once per burst, not once per failure
            self._logged_at = now
            log.error(
                "out of file descriptors (%s: %s); not counted against any tenant",
                where,
                exc,
                extra={"event": "fd_exhausted", "reason": where},
            )

    def recent(self) -> bool:
        return time.monotonic() - self._last_monotonic < GRACE_S

    def as_dict(self) -> dict[str, Any]:
        from django.conf import settings

        from proxy.limits import shedding

        return {
            "ok": not self.recent(),
            "open": count_open_fds(),
            "limit_for_clients": fd_ceiling(settings.TENEMENT_FD_RESERVE),
            "reserve": settings.TENEMENT_FD_RESERVE,
            "exhausted_events": self.events,
            "last_exhausted_at": self.last_at,
            "last_exhausted_in": self.last_where,
            "edge_refused": shedding.as_dict(),
        }


# One per process: the supervisor records, /health and /status read.
pressure = Pressure()
