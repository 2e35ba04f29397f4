"""Signal handling: handlers only set an event; the old handlers come back on exit."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, force: asyncio.Event | None = None
) -> Iterator[None]:
    """The first SIGTERM/SIGINT sets `stop`; a second one sets `force` (skip the drain)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def on_signal() -> None:
        if stop.is_set() and force is not None:
            force.set()
        stop.set()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
