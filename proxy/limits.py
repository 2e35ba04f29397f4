"""Edge limits: what one client may cost before any parsing, routing or waking is done.

The settings come from the environment (README "Edge limits"); the embedded server's
protocol (proxy/edge.py) enforces them. The Gate counts connections, in total and per
client address, and keeps file descriptors in reserve for the supervisor.
"""

from __future__ import annotations

import ipaddress
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EdgeLimits:
    max_head: int  # bytes: request line plus every header line
    max_line: int  # bytes: one header line, "name: value"
    max_headers: int  # header lines per request
    max_url: int  # bytes: the request target
    header_timeout: float  # seconds to receive a whole request head
    keepalive_timeout: float  # seconds an idle keep-alive connection is kept
    body_timeout: float  # seconds between two reads of a request body
    max_connections: int  # open client connections, all addresses
    max_per_address: int  # open client connections from one address
    fd_reserve: int  # descriptors kept for the supervisor (spawns, health checks)
    trusted_proxies: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls) -> EdgeLimits:
        from django.conf import settings

        return cls(
            max_head=settings.TENEMENT_MAX_HEADER_KB * 1024,
            max_line=settings.TENEMENT_MAX_HEADER_LINE_KB * 1024,
            max_headers=settings.TENEMENT_MAX_HEADERS,
            max_url=settings.TENEMENT_MAX_URL_KB * 1024,
            header_timeout=settings.TENEMENT_HEADER_TIMEOUT,
            keepalive_timeout=settings.TENEMENT_KEEPALIVE_TIMEOUT,
            body_timeout=settings.TENEMENT_BODY_TIMEOUT,
            max_connections=settings.TENEMENT_MAX_CONNECTIONS,
            max_per_address=settings.TENEMENT_MAX_CONNECTIONS_PER_ADDRESS,
            fd_reserve=settings.TENEMENT_FD_RESERVE,
            trusted_proxies=settings.TENEMENT_TRUSTED_PROXIES,
        )


def parse_networks(value: str, name: str) -> tuple[Network, ...]:
    """'10.0.0.0/8, ::1' -> networks; a bad entry stops start-up naming the variable."""
    networks = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"{name}: {item!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def is_trusted(address: str | None, networks: tuple[Network, ...]) -> bool:
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def count_open_fds() -> int | None:
    """Descriptors this process has open; None where /proc is not available."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus listdir's own
    except OSError:
        return None


def fd_ceiling(reserve: int) -> int | None:
    """Descriptors the edge may let the process reach; the rest is the supervisor's."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - reserve, 1)


class FdBudget:
    """Whether the process is near its descriptor limit, cheaply.

    Counting /proc/self/fd costs about a millisecond per thousand descriptors, too much for
    every connection. A count is taken at most once a second, plus an allowance of two
    descriptors per connection since (the client's and an upstream one); only when that
    estimate reaches the ceiling is a fresh count taken (at most every 10 ms).
    """

    RESAMPLE_S = 1.0
    PRESSURE_RESAMPLE_S = 0.01

    def __init__(self, reserve: int) -> None:
        self.ceiling = fd_ceiling(reserve)
        self._count = count_open_fds() or 0
        self._at = time.monotonic()
        self._since = 0

    def exhausted(self) -> bool:
        if self.ceiling is None:
            return False
        self._since += 1
        now = time.monotonic()
        estimate = self._count + 2 * self._since
        age = now - self._at
        if age > self.RESAMPLE_S or (estimate >= self.ceiling and age > self.PRESSURE_RESAMPLE_S):
            self._count = count_open_fds() or 0
            self._at, self._since = now, 0
            estimate = self._count
        return estimate >= self.ceiling


@dataclass
class Shedding:
    """Connections refused at the edge, for /health and /status."""

    total: int = 0
    by_reason: Counter[str] | None = None
    last_at: float | None = None  # time.time()

    def record(self, reason: str) -> None:
        self.total += 1
        if self.by_reason is None:
            self.by_reason = Counter()
        self.by_reason[reason] += 1
        self.last_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason or {}),
            "last_at": self.last_at,
        }


# One per process: /health and /status read it.
shedding = Shedding()


class LogThrottle:
    """At most one log line per kind a second: under a flood, logging every refusal would
    cost more than refusing. The lines held back are counted into the next one."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.held: Counter[str] = Counter()

    def allow(self, kind: str) -> int | None:
        """None to stay quiet; else how many lines of this kind were held back."""
        now = time.monotonic()
        if now - self.last.get(kind, -self.interval) < self.interval:
            self.held[kind] += 1
            return None
        self.last[kind] = now
        return self.held.pop(kind, 0)


log_throttle = LogThrottle()


class Gate:
    """Admits client connections under the caps; each admitted one holds a Slot."""

    def __init__(self, limits: EdgeLimits, guard_fds: bool = True) -> None:
        self.limits = limits
        self.open = 0
        self.per_address: Counter[str] = Counter()
        self.fds = FdBudget(limits.fd_reserve) if guard_fds else None

    def admit(self, address: str | None) -> Slot | str:
        """A Slot, or why the connection is refused."""
        if self.fds is not None and self.fds.exhausted():
            return self._refuse("file descriptors")
        if self.open >= self.limits.max_connections:
            return self._refuse("connections")
        # A trusted proxy carries many clients: it is held to the total cap only.
        counted = address if not is_trusted(address, self.limits.trusted_proxies) else None
        if counted and self.per_address[counted] >= self.limits.max_per_address:
            return self._refuse("connections per address")
        self.open += 1
        if counted:
            self.per_address[counted] += 1
        return Slot(self, counted)

    def _refuse(self, reason: str) -> str:
        shedding.record(reason)
        return reason

    def release(self, address: str | None) -> None:
        self.open -= 1
        if address:
            left = self.per_address[address] - 1
            if left > 0:
                self.per_address[address] = left
            else:
                del self.per_address[address]


class Slot:
    """One admitted connection; release() is idempotent."""

    __slots__ = ("address", "gate")

    def __init__(self, gate: Gate, address: str | None) -> None:
        self.gate: Gate | None = gate
        self.address = address

    def release(self) -> None:
        if self.gate is not None:
            self.gate.release(self.address)
            self.gate = None
