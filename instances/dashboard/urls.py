from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from instances.dashboard import charts, detail, logs, overview, releases, tls, tokens

app_name = "dashboard"

urlpatterns = [
    path("", overview.overview, name="overview"),
    path("tenants/add/", overview.add_tenant, name="add-tenant"),
    path("charts/overview.json", charts.overview, name="charts-overview"),
    path("instances/<str:key>/charts.json", charts.instance, name="charts-instance"),
    path("instances/<str:key>/", detail.detail, name="detail"),
    path("instances/<str:key>/action/", overview.instance_action, name="instance-action"),
    path("releases/", releases.releases, name="releases"),
    path("releases/<str:service>/action/", releases.release_action, name="release-action"),
    path("instances/<str:key>/pin/", releases.pin, name="instance-pin"),
    path("logs/", logs.search, name="logs"),
    path("tokens/", tokens.tokens, name="tokens"),
    path("tokens/<str:name>/revoke/", tokens.revoke, name="token-revoke"),
    path("tls/", tls.tls, name="tls"),
    path("tls/domains/<str:name>/remove/", tls.remove_domain, name="domain-remove"),
    path("tls/domains/<str:name>/verify/", tls.verify_domain, name="domain-verify"),
    path(
        "accounts/login/",
        auth_views.LoginView.as_view(redirect_authenticated_user=True),
        name="login",
    ),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
