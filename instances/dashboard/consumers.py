"""The overview's live updates: a WebSocket that re-sends the visible page when it changes.

The supervisor may be another process (scaled mode), so the consumer cannot wait on its
events; instead it checks a tiny change marker in the database twice a second and
re-renders only when it moves, plus every few seconds for uptime, RSS and CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.db.models import Count, Max
from django.http import HttpRequest, QueryDict
from django.middleware.csrf import get_token

from instances.dashboard.overview import Filters, counts, render_rows
from instances.models import Event, Instance

log = logging.getLogger(__name__)

POLL_EVERY = 0.5  # seconds between change-marker checks: updates land within 1 s
REFRESH_EVERY = 5.0  # re-render anyway, for the clocks and the process figures
FORBIDDEN = 4403  # application close code: not a staff session
CSRF_SECRET = re.compile(r"[A-Za-z0-9]{32}")

Marker = tuple[int, Any, int | None]


def change_marker() -> Marker:
    """Moves whenever a row is added, removed or edited, or the supervisor records a
    transition (it writes state with .update(), which leaves updated_at alone, but every
    transition adds an Event)."""
    rows = Instance.objects.order_by().aggregate(n=Count("id"), updated=Max("updated_at"))
    last_event = Event.objects.order_by("-id").values_list("id", flat=True).first()
    return rows["n"], rows["updated"], last_event


def update_message(filters: Filters, csrf_token: str) -> dict[str, Any]:
    return {"type": "update", "counts": counts(), "html": render_rows(filters, csrf_token)}


def csrf_token_for(scope: dict[str, Any]) -> str:
    """A masked CSRF token for the client's own cookie, so the re-rendered action forms
    post like the page's. Empty if it has none; it always has, as the page that opens the
    socket set the cookie."""
    secret = scope.get("cookies", {}).get(settings.CSRF_COOKIE_NAME, "")
    if not CSRF_SECRET.fullmatch(secret):
        return ""
    request = HttpRequest()
    request.META["CSRF_COOKIE"] = secret
    return get_token(request)


class OverviewConsumer(AsyncJsonWebsocketConsumer):
    """ws /ws/overview/?q=&service=&state=&page= — the same filters as the page."""

    watcher: asyncio.Task[None] | None = None
    last_sent: dict[str, Any] | None = None

    async def connect(self) -> None:
        await self.accept()
        user = self.scope.get("user")
        if not (user and user.is_active and user.is_staff):
            # Accept first: a close code reaches the browser only after the handshake.
            await self.close(code=FORBIDDEN)
            return
        self.filters = Filters.from_query(QueryDict(self.scope.get("query_string", b"")))
        self.csrf_token = csrf_token_for(self.scope)
        self.watcher = asyncio.create_task(self.watch(), name=f"overview-watch-{id(self):x}")

    async def disconnect(self, code: int) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watcher

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """The client only listens; anything it sends is ignored."""

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        marker: Marker | None = None
        sent_at = float("-inf")
        try:
            while True:
                new = await database_sync_to_async(change_marker)()
                if new != marker or loop.time() - sent_at >= REFRESH_EVERY:
                    await self.send_update()
                    marker, sent_at = new, loop.time()
                # Polling by design: another process's writes show only in the database.
                await asyncio.sleep(POLL_EVERY)
        except OSError:
            # The tab went away between two updates (uvicorn's ClientDisconnected is an
            # OSError): nothing to report, disconnect() cancels us next.
            log.debug("overview client went away")
        except Exception:
            log.exception("overview updates failed; closing so the client reconnects")
            await self.close(code=1011)

    async def send_update(self) -> None:
        message = await database_sync_to_async(update_message)(self.filters, self.csrf_token)
        if message != self.last_sent:  # e.g. a page of sleeping tenants: nothing ticks
            await self.send_json(message)
            self.last_sent = message
