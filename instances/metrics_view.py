"""GET /metrics on the control host: a read token, or the private metrics listener.

Loopback is no credential: tenants share it. Only requests that arrived on the listener
of `runsupervisor --metrics-bind` (which tenants cannot reach) are let in without a token.
"""

from __future__ import annotations

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from instances import metrics, tokens
from instances.api.auth import record_failure, retry_after


def plain(status: int, text: str, **headers: str) -> HttpResponse:
    response = HttpResponse(f"{text}\n", status=status, content_type="text/plain; charset=utf-8")
    for name, value in headers.items():
        response[name] = value
    return response


# Set in the ASGI scope by proxy.server.private_listener for the --metrics-bind listener.
PRIVATE_LISTENER = "tenement.private_listener"


def refusal(request: HttpRequest) -> HttpResponse | None:
    """None if the caller may read the metrics, else the answer to give it."""
    address = request.META.get("REMOTE_ADDR") or "unknown"
    if getattr(request, "scope", {}).get(PRIVATE_LISTENER):
        return None
    challenge = {"WWW-Authenticate": 'Bearer realm="tenement"'}
    scheme, _, secret = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() != "bearer":
        return plain(401, "a bearer token with read scope is required", **challenge)
    # The API's limit on failed attempts, shared with it.
    if (wait := retry_after(address)) is not None:
        message = f"too many failed attempts; retry in {wait} s"
        return plain(429, message, **{"Retry-After": str(wait)})
    token = tokens.verify(secret.strip())
    if token is None:
        record_failure(address)
        return plain(401, "invalid, expired or revoked token", **challenge)
    # Every scope includes read; a tenant restriction is what can refuse a valid token.
    if token.tenant:
        # Metrics describe every tenant: a tenant-restricted token may not read them.
        return plain(403, "this token may not read metrics of every tenant")
    return None


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not settings.TENEMENT_METRICS:
        return plain(404, "metrics are off (TENEMENT_METRICS=0)")
    if (refused := refusal(request)) is not None:
        return refused
    try:
        body = metrics.exposition()
    except DatabaseError as e:  # the state gauges come from the database
        return plain(503, f"metrics unavailable: the database cannot be read ({e})")
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
