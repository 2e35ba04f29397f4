"""systemd's notify protocol for `Type=notify` units: READY, WATCHDOG, STATUS, STOPPING.

The protocol is one datagram per message to the Unix socket in $NOTIFY_SOCKET (a path,
or an abstract name starting with '@'): a few lines, so no library. Readiness and every
watchdog ping are decided by the same checks as GET /health (instances/health.py): a
supervisor whose loop lags, whose database does not answer or whose tasks died stops
pinging, and systemd restarts it after WatchdogSec.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from instances.supervisor import Supervisor

log = logging.getLogger("tenement.systemd")

# Until the first healthy check: how often to look again before saying READY=1.
READY_PROBE_S = 0.2
# With no watchdog configured, STATUS= is still refreshed this often.
STATUS_EVERY_S = 10.0


class Notifier:
    """Sends notify messages; a send that fails is logged once, never raised."""

    def __init__(self, path: str) -> None:
        # '@name' is an abstract socket: its address starts with a NUL byte.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.warned = False

    def send(self, *fields: str) -> bool:
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self.warned:
                log.warning("cannot notify systemd at %s: %s", self.address, e)
                self.warned = True
            return False
        return True

    def close(self) -> None:
        self.sock.close()


def from_environment() -> tuple[Notifier, float | None] | None:
    """The notifier and the watchdog ping interval (seconds), taken out of the
    environment so nothing started later (an `inherit_env` tenant) sees them."""
    path = os.environ.pop("NOTIFY_SOCKET", None)
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not path:
        return None
    interval = None
    if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
        interval = int(usec) / 2 / 1_000_000  # ping at half the timeout, as sd_notify advises
    return Notifier(path), interval


def task(notifier: Notifier, watchdog: float | None) -> Callable[[Supervisor], Awaitable[None]]:
    """A supervisor task: READY=1 once /health's checks pass, then WATCHDOG=1 each interval
    while they pass (STATUS= says why when they do not), STOPPING=1 at shutdown."""

    async def run(supervisor: Supervisor) -> None:
        from instances.health import run_checks

        ready, healthy = False, True
        try:
            while not supervisor.stop_event.is_set():
                _checks, reason = await run_checks()
                if not reason and not ready:
                    ready = notifier.send("READY=1", f"STATUS=serving; pid {os.getpid()}")
                    log.info("told systemd we are ready", extra={"event": "systemd_ready"})
                if ready and not reason and watchdog is not None:
                    notifier.send("WATCHDOG=1")
                if bool(reason) == healthy:  # a change: say it once, not every tick
                    healthy = not reason
                    notifier.send(f"STATUS={'unhealthy: ' + reason if reason else 'serving'}")
                wait = READY_PROBE_S if not ready else watchdog or STATUS_EVERY_S
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(supervisor.stop_event.wait(), wait)
            notifier.send("STOPPING=1", "STATUS=stopping every instance")
        finally:
            notifier.close()

    return run
