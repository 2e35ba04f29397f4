"""What the API shows of services, instances, events and tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
from rest_framework import serializers

from instances.addresses import parse_tcp
from instances.ids import LABEL_RE
from instances.models import ApiToken, Event, Instance, Service
from instances.spec import ServiceSpec
from instances.supervisor import storage

INVALID_ID = (
    "must be 1 to 63 lowercase letters, digits and '-' (a DNS label: '_' cannot appear in "
    "a host name)"
)
# DRF's RegexField searches; anchor it so "Bad/.." does not pass on its "ad".
LABEL = rf"\A{LABEL_RE.pattern}\Z"

# What an API write may set: the keys of [service.NAME] that a Service row stores.
WRITABLE_SERVICE_FIELDS = (
    "command",
    "args",
    "socket",
    "health",
    "env",
    "workdir",
    "inherit_env",
    "idle_timeout",
    "startup_timeout",
    "request_timeout",
    "wake_timeout",
    "stop_timeout",
    "log_retention_lines",
    "isolation",
    "network",
    "user",
    "mounts",
    "memory_limit_mb",
    "cpu_shares",
    "cpu_max",
    "pids_max",
    "storage_quota_mb",
    "storage_persist",
    "restart",
    "listen",
)
SERVICE_FIELDS = ["name", *WRITABLE_SERVICE_FIELDS, "source", "created_at", "updated_at"]


class ServiceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Service
        fields = SERVICE_FIELDS
        read_only_fields = SERVICE_FIELDS

    def to_representation(self, instance: Service) -> dict[str, Any]:
        data = super().to_representation(instance)
        if not self.context.get("show_env", False):
            # env may hold secrets: only admin callers see the values.
            data["env"] = {key: "***" for key in data["env"]}
        return data


class InstanceSerializer(serializers.ModelSerializer):
    key = serializers.SerializerMethodField()
    service = serializers.CharField(source="service.name")
    uptime_seconds = serializers.SerializerMethodField()
    idle_seconds = serializers.SerializerMethodField()
    rss_bytes = serializers.SerializerMethodField()
    cpu_percent = serializers.SerializerMethodField()
    url = serializers.SerializerMethodField()
    # Upstream's fields (its `ten ps` reads them): the same facts under its names.
    id = serializers.SerializerMethodField(help_text="SERVICE:ID (upstream's)")
    socket = serializers.SerializerMethodField(help_text="where it listens (upstream's)")
    uptime_secs = serializers.SerializerMethodField()
    idle_secs = serializers.SerializerMethodField()
    restarts = serializers.IntegerField(source="restart_count", read_only=True)
    health = serializers.SerializerMethodField(help_text="healthy|unhealthy|failed|unknown")
    storage_used_bytes = serializers.SerializerMethodField()
    storage_quota_bytes = serializers.SerializerMethodField()

    class Meta:
        model = Instance
        fields = [
            "id",
            "socket",
            "port",
            "uptime_secs",
            "idle_secs",
            "restarts",
            "health",
            "storage_used_bytes",
            "storage_quota_bytes",
            "weight",
            "key",
            "service",
            "instance_id",
            "state",
            "desired_state",
            "always_on",
            "pid",
            "uptime_seconds",
            "idle_seconds",
            "restart_count",
            "last_exit_code",
            "last_error",
            "health_ok",
            "health_checked_at",
            "rss_bytes",
            "cpu_percent",
            "url",
            "isolation",
            "uid",
            "started_at",
            "last_activity",
            "created_at",
            # Releases: the pin and the release it last ran healthy on ("weight", upstream's
            # share of the weighted host, is listed with upstream's fields above).
            "release",
            "last_release",
        ]
        read_only_fields = fields

    def get_key(self, obj: Instance) -> str:
        return str(obj.key)

    def get_id(self, obj: Instance) -> str:
        return str(obj.key)

    def get_socket(self, obj: Instance) -> str:
        return listen_address(obj)

    def get_uptime_secs(self, obj: Instance) -> int:
        return int(obj.uptime_seconds(self.context.get("now")) or 0)

    def get_idle_secs(self, obj: Instance) -> int:
        return int(obj.idle_seconds(self.context.get("now")) or 0)

    def get_health(self, obj: Instance) -> str:
        return upstream_health(obj)

    def get_storage_used_bytes(self, obj: Instance) -> int:
        # A list may hold a thousand tenants: a capped walk (the storage endpoint's is full).
        used, _ = storage.measure(data_dir_of(obj), max_entries=LIST_STORAGE_ENTRIES)
        return used

    def get_storage_quota_bytes(self, obj: Instance) -> int | None:
        quota = obj.service.storage_quota_mb
        return quota * 2**20 if quota else None

    def get_uptime_seconds(self, obj: Instance) -> float | None:
        return obj.uptime_seconds(self.context.get("now"))

    def get_idle_seconds(self, obj: Instance) -> float | None:
        return obj.idle_seconds(self.context.get("now"))

    def get_rss_bytes(self, obj: Instance) -> int | None:
        proc = live_process(obj)
        if proc is None:
            return None
        # The recorded pid may be the sandbox (bwrap): the app is among its descendants.
        try:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except psutil.Error:
            return None

    def get_cpu_percent(self, obj: Instance) -> float | None:
        proc = live_process(obj)
        return proc.cpu_percent(interval=None) if proc else None

    def get_url(self, obj: Instance) -> str:
        """As the dashboard shows it: the scheme and port the API was reached on."""
        from django.conf import settings

        from instances.dashboard.display import tenant_url

        request = self.context.get("request")
        if request is None:  # serialized outside a request (upstream's telemetry rows)
            return f"http://{obj.instance_id}.{obj.service.name}.{settings.TENEMENT_DOMAIN}/"
        return tenant_url(request, obj)


LIST_STORAGE_ENTRIES = 1000


def data_dir_of(obj: Instance) -> Path:
    return ServiceSpec.from_model(obj.service).instance_dir(obj.instance_id)


def listen_address(obj: Instance) -> str:
    """Upstream's `socket`: the Unix socket path, or 127.0.0.1:PORT for a TCP app."""
    address = obj.socket_path or ServiceSpec.from_model(obj.service).socket_path(obj.instance_id)
    tcp = parse_tcp(address)
    return f"{tcp[0]}:{tcp[1]}" if tcp else address


def upstream_health(obj: Instance) -> str:
    """Upstream's health words for our state: healthy, unhealthy, failed or unknown."""
    if obj.state == Instance.State.FAILED:
        return "failed"
    if obj.state == Instance.State.BACKOFF:
        return "unhealthy"
    if obj.state == Instance.State.RUNNING:
        return "healthy" if obj.health_ok is not False else "unhealthy"
    return "unknown"


# psutil's cpu_percent compares with the previous call on the same Process object, so keep
# them (keyed by pid and start time, which a reused pid cannot match).
_processes: dict[tuple[int, float | None], psutil.Process] = {}


def live_process(obj: Instance) -> psutil.Process | None:
    if obj.state != Instance.State.RUNNING or not obj.pid:
        return None
    key = (obj.pid, obj.pid_create_time)
    proc = _processes.get(key)
    try:
        if proc is None:
            proc = psutil.Process(obj.pid)
            proc.cpu_percent(interval=None)  # primes the counter
            if len(_processes) > 10_000:
                _processes.clear()
            _processes[key] = proc
        if not proc.is_running():
            raise psutil.NoSuchProcess(obj.pid)
        return proc
    except psutil.Error:
        _processes.pop(key, None)
        return None


class InstanceCreateSerializer(serializers.Serializer):
    service = serializers.RegexField(LABEL, max_length=63)
    instance_id = serializers.RegexField(
        LABEL,
        max_length=63,
        error_messages={"invalid": INVALID_ID},
    )
    start = serializers.BooleanField(default=True)


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = Event
        fields = ["time", "kind", "from_state", "to_state", "message"]
        read_only_fields = fields


class TokenSerializer(serializers.ModelSerializer):
    class Meta:
        model = ApiToken
        fields = [
            "name",
            "prefix",
            "scope",
            "tenant",
            "expires_at",
            "last_used_at",
            "revoked_at",
            "created_at",
        ]
        read_only_fields = fields


class StrictCharField(serializers.CharField):
    """A CharField that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class TokenCreateSerializer(serializers.Serializer):
    name = StrictCharField(min_length=1, max_length=100)
    scope = serializers.ChoiceField(choices=ApiToken.Scope.choices, default="read")
    tenant = serializers.RegexField(LABEL, max_length=63, required=False, default="")
    expires_days = serializers.FloatField(
        required=False, allow_null=True, min_value=0.0001, max_value=3650
    )


class SpawnSerializer(serializers.Serializer):
    """Upstream's spawn body."""

    process = serializers.RegexField(LABEL, max_length=63, help_text="the service")
    id = serializers.RegexField(
        LABEL,
        max_length=63,
        error_messages={"invalid": INVALID_ID},
        help_text="the tenant id",
    )


class HealthSerializer(serializers.Serializer):
    instance = serializers.CharField()
    health = serializers.CharField(help_text="healthy, unhealthy, failed or unknown")
    state = serializers.CharField()
    health_ok = serializers.BooleanField(allow_null=True)
    health_checked_at = serializers.DateTimeField(allow_null=True)


class StorageSerializer(serializers.Serializer):
    used_bytes = serializers.IntegerField()
    quota_bytes = serializers.IntegerField(allow_null=True)
    usage_percent = serializers.FloatField(allow_null=True)
    path = serializers.CharField()
    complete = serializers.BooleanField(help_text="false: the walk stopped early (at least)")
