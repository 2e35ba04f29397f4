"""WebSocket routes of the control host (the dashboard's live updates)."""

from __future__ import annotations

websocket_urlpatterns: list = []
