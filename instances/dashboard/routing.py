"""WebSocket routes of the control host (the dashboard's live updates)."""

from __future__ import annotations

from django.urls import path

from instances.dashboard.consumers import OverviewConsumer

websocket_urlpatterns = [
    path("ws/overview/", OverviewConsumer.as_asgi(), name="ws-overview"),
]
