"""GET /api/tls/status: upstream's fields, then ours (every certificate, the orders)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from instances.api.auth import tenant_of
from proxy.tls import manager as tls_manager

DISABLED_HINT = (
    "Set [settings.tls] enabled = true in tenement.toml: tenement obtains and renews "
    "certificates itself, for the control host, every tenant host and custom domains"
)


def status() -> dict[str, Any]:
    """The TLS status of this process (what the API, `ten tls status` and the dashboard
    show). Certificates are known to the process serving HTTPS: the supervisor's."""
    manager = tls_manager.current()
    if manager is None:
        return {
            "enabled": False,
            "domain": None,
            "staging": False,
            "https_port": 443,
            "http_port": 80,
            "recommendation": DISABLED_HINT,
            "certificates": [],
        }
    config = manager.config
    return {
        "enabled": True,
        "domain": config.domain,
        "staging": config.staging,
        "https_port": config.https_port,
        "http_port": config.http_port,
        "recommendation": None,
        "directory_url": config.directory_url,
        "on_demand": config.on_demand,
        "wildcard": config.wildcard,
        "redirect_http": config.redirect_http,
        "orders": dict(manager.outcomes),
        "certificates": manager.status(),
    }


class TlsStatusView(APIView):
    """Upstream's `/api/tls/status`, extended with each certificate's names, issuer,
    expiry, next renewal and last error."""

    @extend_schema(responses={200: OpenApiResponse(description="TLS status")})
    def get(self, request: Request) -> Response:
        if tenant_of(request):
            raise PermissionDenied("TLS status covers every tenant: use an unrestricted token")
        return Response(status())
