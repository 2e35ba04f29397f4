"""ASGI entry point: `daphne tenement_site.asgi:application` or the embedded server.

A Channels ProtocolTypeRouter; each protocol routes by Host: the control host
(TENEMENT_DOMAIN) to Django, `{id}.{service}.{domain}` to that instance.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenement_site.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from instances.dashboard.routing import websocket_urlpatterns  # noqa: E402
from proxy.app import HostRouter  # noqa: E402
from proxy.forwarded import ClientAddress  # noqa: E402
from tenement_site.control import BodyLimit, SameOriginWebSocket  # noqa: E402

# The dashboard's live updates: session login, and a same-origin check (CSWSH): the
# control host's own origin only, never a tenant's subdomain.
control_websockets = SameOriginWebSocket(AuthMiddlewareStack(URLRouter(websocket_urlpatterns)))

application = ClientAddress(
    ProtocolTypeRouter(
        {
            # Control-host bodies are bounded before Django spools them (and before auth).
            "http": HostRouter(BodyLimit(django_asgi_app), "http"),
            "websocket": HostRouter(control_websockets, "websocket"),
        }
    ),
    # Behind nginx or Caddy: the client's address and scheme, as the proxy reports them.
    settings.TENEMENT_TRUSTED_PROXIES,
)
