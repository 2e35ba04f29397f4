"""Where an app is reached: a Unix socket path, or `tcp:127.0.0.1:PORT` for an app that
listens on its $PORT. Both travel as one string (routing snapshot, wake answers, the
Instance row's socket_path); a socket path is always absolute, so they cannot clash."""

from __future__ import annotations

TCP_PREFIX = "tcp:"
LOOPBACK = "127.0.0.1"


def tcp_address(port: int) -> str:
    return f"{TCP_PREFIX}{LOOPBACK}:{port}"


def parse_tcp(address: str) -> tuple[str, int] | None:
    """(host, port) of a tcp: address; None for a Unix socket path."""
    if not address.startswith(TCP_PREFIX):
        return None
    host, _, port = address.removeprefix(TCP_PREFIX).rpartition(":")
    return host, int(port)
