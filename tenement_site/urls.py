from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from instances import health
from instances.metrics_view import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("instances.api.urls")),
    path("metrics", metrics_view, name="metrics"),
    # Liveness and status: no login (see instances/health.py for who may read /status).
    path("health", health.health, name="health"),
    path("status", health.status, name="status"),
    path("", include("instances.dashboard.urls")),
]
