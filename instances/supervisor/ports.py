"""Loopback ports for $PORT: one per running instance, from [settings] port_range.

Upstream gives every instance a TCP port; apps written to its contract read $PORT. A
port is ours while its instance runs; one something else on the host holds is skipped.
"""

from __future__ import annotations

import socket

from instances.addresses import LOOPBACK


class PortsExhausted(Exception):
    pass


def _free(port: int) -> bool:
    """Whether nothing on the host holds the port now (the app binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


class PortPool:
    """Hands out ports round-robin, so a port just released is not reused at once (a
    client of the old process could still reach the new one)."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        self.cursor = 0

    def allocate(self, ports: range) -> int:
        for i in range(len(ports)):
            port = ports[(self.cursor + i) % len(ports)]
            if port not in self.taken and _free(port):
                self.cursor = (self.cursor + i + 1) % len(ports)
                self.taken.add(port)
                return port
        raise PortsExhausted(
            f"no free port in port_range {ports.start}-{ports.stop - 1} "
            f"({len(self.taken)} in use by instances); widen [settings] port_range"
        )

    def release(self, port: int | None) -> None:
        self.taken.discard(port)  # type: ignore[arg-type]
