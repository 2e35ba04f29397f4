"""The channel-layer names the proxy and the supervisor share, and a resilient receive.

The messages themselves are described in proxy/state.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger("tenement")

SUPERVISOR_CHANNEL = "tenement.supervisor"
PROXY_GROUP = "tenement.proxy"
RECEIVE_RETRY_SECONDS = 1.0


async def receive_forever(layer: Any, channel: str) -> AsyncIterator[dict[str, Any]]:
    """Messages on `channel` until cancelled; a failing layer (e.g. Redis restarting) is
    waited out rather than ending the loop for good."""
    while True:
        try:
            message = await layer.receive(channel)
        except Exception as e:
            log.warning(
                "channel layer receive failed (%s); retrying in %g s", e, RECEIVE_RETRY_SECONDS
            )
            await asyncio.sleep(RECEIVE_RETRY_SECONDS)
            continue
        yield message
