"""Settings for tenement. Everything comes from the environment, with safe defaults.

See the README's "Configuration" section for every variable.
"""

from __future__ import annotations

import os
import re
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from proxy.limits import parse_networks
from tenement_site import bootstrap
from tenement_site import logging as tenement_logging
from tenement_site.bootstrap import (
    data_dir_from_env,
    ensure_data_dir,
    ensure_private_file,
    load_or_create_secret_key,
)

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def env_seconds(name: str, default: float, maximum: float) -> float:
    value = os.environ.get(name)
    try:
        seconds = float(value) if value else default
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= maximum:
        raise ImproperlyConfigured(f"{name}={value!r}: expected seconds from 0 to {maximum:g}")
    return seconds


def env_positive(name: str, default: float, kind: type[int] | type[float] = int) -> Any:
    """A limit from the environment: a positive number, or start-up stops naming it."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not 0 < number < 2**31 or number != number:  # also refuses nan
        raise ImproperlyConfigured(
            f"{name}: {value!r} is not a positive {kind.__name__} (default {default})"
        )
    return number


TENEMENT_DATA_DIR = data_dir_from_env()
ensure_data_dir(TENEMENT_DATA_DIR)
TENEMENT_DOMAIN = (os.environ.get("TENEMENT_DOMAIN") or "localhost").lower().rstrip(".")
TENEMENT_LOG_RETENTION_LINES = env_int("TENEMENT_LOG_RETENTION_LINES", 10_000)
# The proxy: request bodies over this many MB get 413; at most this many requests per
# instance are held while it wakes (more get 503 with Retry-After).
TENEMENT_MAX_BODY_MB = env_int("TENEMENT_MAX_BODY_MB", 100)
TENEMENT_MAX_HELD_REQUESTS = env_int("TENEMENT_MAX_HELD_REQUESTS", 1000)
# Weighted service hosts ({service}.{domain}): a cookie of this name keeps a browser on the
# instance it was first sent to (while that one keeps a weight); empty = per request.
TENEMENT_STICKY_COOKIE = os.environ.get("TENEMENT_STICKY_COOKIE", "").strip()
if TENEMENT_STICKY_COOKIE and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", TENEMENT_STICKY_COOKIE):
    raise ImproperlyConfigured(
        f"TENEMENT_STICKY_COOKIE={TENEMENT_STICKY_COOKIE!r}: a cookie name is 1 to 64 "
        "letters, digits, '_', '.' or '-'"
    )
# On SIGTERM, in-flight requests get this many seconds to finish before they are cut
# (a second signal cuts at once); then every instance is stopped.
TENEMENT_DRAIN_TIMEOUT = env_seconds("TENEMENT_DRAIN_TIMEOUT", 10.0, maximum=3600)
# The API: this many failed token checks from one address in a minute, then 429.
TENEMENT_AUTH_FAILURE_LIMIT = env_int("TENEMENT_AUTH_FAILURE_LIMIT", 10)
# Prometheus metrics at /metrics (README "Metrics"): off removes them from the hot path;
# per-instance adds an `instance` label (cost at 1,000 tenants in the README). /metrics and
# /status always need a read token, except on the private `--metrics-bind` listener.
TENEMENT_METRICS = env_bool("TENEMENT_METRICS", True)
TENEMENT_METRICS_PER_INSTANCE = env_bool("TENEMENT_METRICS_PER_INSTANCE", False)
# Upstream's wake of any id: a request for an unregistered tenant of a defined service
# registers it. Off by default: anyone who can reach the proxy could create tenants.
TENEMENT_REGISTER_ON_REQUEST = env_bool("TENEMENT_REGISTER_ON_REQUEST", False)
if not env_bool("TENEMENT_METRICS_REQUIRE_TOKEN", True):
    # Accepted before: open metrics on loopback. Tenants share loopback, so it is refused.
    raise ImproperlyConfigured(
        "TENEMENT_METRICS_REQUIRE_TOKEN=0 is no longer supported: tenants share loopback, so "
        "it would show them every tenant's metrics; use `runsupervisor --metrics-bind "
        "unix:/run/tenement/metrics.sock` (no token needed there) or a read token"
    )
# storage_quota_mb: how often each running tenant's data dir is measured (seconds).
TENEMENT_STORAGE_CHECK_SECONDS = float(os.environ.get("TENEMENT_STORAGE_CHECK_SECONDS") or 60)
# The edge (README "Edge limits"): checked in the server's protocol layer before any
# parsing past the limit, routing or waking. Sizes in KiB, times in seconds.
TENEMENT_MAX_HEADER_KB = env_positive("TENEMENT_MAX_HEADER_KB", 64)
TENEMENT_MAX_HEADER_LINE_KB = env_positive("TENEMENT_MAX_HEADER_LINE_KB", 8)
TENEMENT_MAX_HEADERS = env_positive("TENEMENT_MAX_HEADERS", 100)
TENEMENT_MAX_URL_KB = env_positive("TENEMENT_MAX_URL_KB", 8)
TENEMENT_HEADER_TIMEOUT = env_positive("TENEMENT_HEADER_TIMEOUT", 10.0, float)
TENEMENT_KEEPALIVE_TIMEOUT = env_positive("TENEMENT_KEEPALIVE_TIMEOUT", 15.0, float)
TENEMENT_BODY_TIMEOUT = env_positive("TENEMENT_BODY_TIMEOUT", 60.0, float)
TENEMENT_MAX_CONNECTIONS = env_positive("TENEMENT_MAX_CONNECTIONS", 10_000)
TENEMENT_MAX_CONNECTIONS_PER_ADDRESS = env_positive("TENEMENT_MAX_CONNECTIONS_PER_ADDRESS", 256)
TENEMENT_FD_RESERVE = env_positive("TENEMENT_FD_RESERVE", 128)
# Custom domains' TXT verification asks this DNS server ("HOST:PORT"); empty: the system's.
TENEMENT_DNS_RESOLVER = os.environ.get("TENEMENT_DNS_RESOLVER", "")
# Peers whose Forwarded/X-Forwarded-* headers are believed (comma-separated IPs or CIDR
# networks). Empty: every client's own copies are replaced.
TENEMENT_TRUSTED_PROXIES = parse_networks(
    os.environ.get("TENEMENT_TRUSTED_PROXIES", ""), "TENEMENT_TRUSTED_PROXIES"
)
# The dashboard's charts link here (a Grafana dashboard of tenement's metrics) if set.
TENEMENT_GRAFANA_URL = os.environ.get("TENEMENT_GRAFANA_URL", "")
if TENEMENT_GRAFANA_URL and not TENEMENT_GRAFANA_URL.startswith(("https://", "http://")):
    raise ImproperlyConfigured(
        f"TENEMENT_GRAFANA_URL: {TENEMENT_GRAFANA_URL!r} is not an http(s):// address"
    )
# The dashboard's charts: one point per this many seconds, the last hour kept in memory.
_charts_step = os.environ.get("TENEMENT_CHARTS_STEP_SECONDS") or "10"
if not _charts_step.isdigit() or not 1 <= int(_charts_step) <= 300:
    raise ImproperlyConfigured(
        f"TENEMENT_CHARTS_STEP_SECONDS: {_charts_step!r} is not a whole number of seconds "
        "from 1 to 300"
    )
TENEMENT_CHARTS_STEP_SECONDS = int(_charts_step)
# One structured log line per tenant request (logger tenement.access): off by default.
TENEMENT_ACCESS_LOG = env_bool("TENEMENT_ACCESS_LOG", False)
# /health: unhealthy when the event loop ran a timer this many ms late (last 5 s).
TENEMENT_HEALTH_MAX_LAG_MS = env_int("TENEMENT_HEALTH_MAX_LAG_MS", 1000)

SECRET_KEY = load_or_create_secret_key(TENEMENT_DATA_DIR)
DEBUG = env_bool("DJANGO_DEBUG", False)
# Tenant subdomains never reach Django (proxy/app.py routes them to their apps), so they
# are not listed: Django's host checks see the control host alone.
# The control host also answers on localhost and loopback whatever TENEMENT_DOMAIN is, so
# on-host health checks and the CLI always reach it (routing/hosts.py agrees).
ALLOWED_HOSTS = [
    TENEMENT_DOMAIN,
    "localhost",
    "127.0.0.1",
    "[::1]",
    *filter(None, os.environ.get("TENEMENT_ALLOWED_HOSTS", "").split(",")),
]
# Behind a TLS terminator: scope["scheme"] already says https for a trusted proxy
# (proxy/forwarded.py), and its X-Forwarded-Proto reaches Django from trusted peers only
# (everyone else's copy is removed), so Django may read it too.
if TENEMENT_TRUSTED_PROXIES:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Dashboard forms posted from the control host's own origin, whichever scheme the client
# used: the proxy in front may not pass the port, so Origin and Host can differ by it.
CSRF_TRUSTED_ORIGINS = [f"https://{TENEMENT_DOMAIN}", f"http://{TENEMENT_DOMAIN}"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "axes",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "instances",
    "routing",
    "proxy",
    "django_prometheus",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # After authentication: it refuses logins of a locked-out account or address.
    "axes.middleware.AxesMiddleware",
    "tenement_site.control.DatabaseBusy",
]
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Login throttling (django-axes), per account and per address separately: after this
# many failures either is locked for the cool-off, the right password included.
AXES_FAILURE_LIMIT = env_positive("TENEMENT_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_positive("TENEMENT_LOGIN_COOLOFF_MINUTES", 15.0, float))
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_CLIENT_IP_CALLABLE = "tenement_site.control.client_ip"
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False
# The control host reads bodies up to this size into memory; larger get 413 before auth.
TENEMENT_CONTROL_MAX_BODY_KB = env_positive("TENEMENT_CONTROL_MAX_BODY_KB", 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = TENEMENT_CONTROL_MAX_BODY_KB * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = TENEMENT_CONTROL_MAX_BODY_KB * 1024
if TENEMENT_METRICS:
    # django-prometheus's request metrics: its "before" first, its "after" last.
    MIDDLEWARE = [
        "django_prometheus.middleware.PrometheusBeforeMiddleware",
        *MIDDLEWARE,
        "django_prometheus.middleware.PrometheusAfterMiddleware",
    ]

ROOT_URLCONF = "tenement_site.urls"
LOGIN_URL = "dashboard:login"
LOGIN_REDIRECT_URL = "dashboard:overview"
LOGOUT_REDIRECT_URL = "dashboard:login"
ASGI_APPLICATION = "tenement_site.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_sqlite_path = TENEMENT_DATA_DIR / "tenement.sqlite3"
DATABASES = {
    "default": dj_database_url.config(
        env="DATABASE_URL", default=f"sqlite:///{_sqlite_path}", conn_max_age=600
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The database holds services' env (secrets): never world-readable.
    ensure_private_file(_sqlite_path)
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets the CLI read while the supervisor writes; IMMEDIATE avoids
        # lock-upgrade deadlocks between those processes; timeout waits out short locks.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
if "postgresql" in DATABASES["default"]["ENGINE"]:
    # libpq waits forever for a server that does not answer: fail within seconds instead,
    # so /health reports it and the supervisor's database retries stay short.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Bearer first: its challenge makes unauthenticated calls 401, not 403.
        "instances.api.auth.BearerAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["instances.api.auth.ScopePermission"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["instances.api.errors.StrictJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "instances.api.schema.TenementSchema",
    "EXCEPTION_HANDLER": "instances.api.errors.handle",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "tenement API",
    # Markdown: in backticks, or Swagger UI would take <token> for an HTML tag and hide it.
    "DESCRIPTION": "Services, instances, logs and tokens. Send `Authorization: Bearer <token>`.",
    "VERSION": "1",
    # 3.1: JSON Schema 2020-12, so the service body can be the config loader's own schema.
    "OAS_VERSION": "3.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Wakes, readiness and activity travel between the proxy and the supervisor on this
# layer. The default capacity (100 per channel) would refuse a burst of 100+ wakes.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels.layers.InMemoryChannelLayer",
        "CONFIG": {"capacity": 100_000, "expiry": 60},
    }
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Outside every service's tree ({data_dir}/{service}/{id}): no service name can start
# with a dot, so no tenant's files can land in what whitenoise serves under /static/.
STATIC_ROOT = TENEMENT_DATA_DIR / ".static"
if not bootstrap.READ_ONLY:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # whitenoise warns on a missing root
# Serve straight from the source folders so the embedded default needs no collectstatic.
WHITENOISE_USE_FINDERS = True
# whitenoise hands Django a file iterator; under ASGI Django then warns on every static
# file that it reads it in a thread. The files are small and cached by browsers, so the
# warning is only log noise for operators.
warnings.filterwarnings(
    "ignore", message="StreamingHttpResponse must consume synchronous iterators"
)

LOG_LEVEL = (os.environ.get("TENEMENT_LOG_LEVEL") or "INFO").upper()
# One line per event, plain (logfmt-style) or JSON; per-logger levels in TENEMENT_LOG_LEVELS.
LOGGING = tenement_logging.config(
    os.environ.get("TENEMENT_LOG_FORMAT") or "plain",
    LOG_LEVEL,
    os.environ.get("TENEMENT_LOG_LEVELS", ""),
)
