from __future__ import annotations

from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import DefaultRouter

from instances.api import logs, schema, telemetry, views  # noqa: F401  (schema: an extension)
from proxy.tls.api import TlsStatusView
from routing.domains_api import DomainViewSet

router = DefaultRouter()
router.trailing_slash = "/?"  # scripts and the CLI may leave the slash off; no redirect
router.register("services", views.ServiceViewSet, basename="service")
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("tokens", views.TokenViewSet, basename="token")
router.register("domains", DomainViewSet, basename="domain")

urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # One route each, the slash optional as the router's: one operation in the schema.
    re_path(r"^telemetry/?$", telemetry.TelemetryView.as_view(), name="api-telemetry"),
    re_path(r"^logs/?$", logs.LogSearchView.as_view(), name="api-logs"),
    re_path(r"^logs/stream/?$", logs.LogStreamView.as_view(), name="api-logs-stream"),
    re_path(r"^tls/status/?$", TlsStatusView.as_view(), name="api-tls-status"),
    # Releases and weights (upstream's weight/deploy/route too), before the router's
    # instance routes so that /instances/{key}/weight is ours.
    path("", include("routing.api")),
    path("", include(router.urls)),
    # Anything else under /api/ is a JSON 404, not Django's HTML page.
    re_path(r"", views.not_found),
]
