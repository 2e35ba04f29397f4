"""Desired state (what operators asked for) and history (what happened).

The supervisor owns the actual-state columns and writes them with queryset
.update(), which leaves updated_at alone; any bump of updated_at therefore
means "someone else changed this row" and is what the supervisor watches.
"""

from __future__ import annotations

import time

from django.core.validators import RegexValidator
from django.db import models

from instances.ids import LABEL_RE, LABEL_RULE, InstanceKey

label_validator = RegexValidator(rf"\A{LABEL_RE.pattern}\Z", f"Must be {LABEL_RULE}.")


class Service(models.Model):
    """One [service.NAME] table: how to run an app for any tenant."""

    name = models.CharField(max_length=63, unique=True, validators=[label_validator])
    command = models.TextField()
    args = models.JSONField(default=list, blank=True)
    socket = models.TextField(blank=True, help_text="Socket path template; blank = default.")
    health = models.CharField(max_length=255, blank=True, help_text="HTTP path; blank = connect.")
    env = models.JSONField(default=dict, blank=True)
    workdir = models.TextField(blank=True)
    inherit_env = models.BooleanField(default=False)
    idle_timeout = models.FloatField(default=0, help_text="Seconds; 0 = never stop for idleness.")
    startup_timeout = models.FloatField(default=10)
    request_timeout = models.FloatField(default=30)
    wake_timeout = models.FloatField(default=30)
    stop_timeout = models.FloatField(default=10)
    log_retention_lines = models.PositiveIntegerField(default=10_000)
    # Isolation and limits (README "Security"): enforced at spawn, or the start fails.
    isolation = models.CharField(max_length=32, default="namespace")
    network = models.CharField(max_length=8, default="host")
    user = models.CharField(
        max_length=32, blank=True, help_text="Run as this user; blank = own uid."
    )
    mounts = models.JSONField(default=list, blank=True)
    memory_limit_mb = models.PositiveIntegerField(null=True, blank=True)
    cpu_shares = models.PositiveIntegerField(null=True, blank=True)
    cpu_max = models.CharField(max_length=8, blank=True, help_text='e.g. "50%" of one CPU.')
    pids_max = models.PositiveIntegerField(null=True, blank=True)
    storage_quota_mb = models.PositiveIntegerField(null=True, blank=True)
    storage_persist = models.BooleanField(default=True)
    # Upstream's restart policy: always | on-failure | never (see README "The supervisor").
    restart = models.CharField(max_length=16, default="on-failure")
    # Where readiness and proxying go: auto (whichever the app opened) | unix | tcp.
    listen = models.CharField(max_length=8, default="auto")
    # Where the definition came from, so a config reload never clobbers API-made services.
    source = models.CharField(max_length=255, blank=True)
    config_dir = models.TextField(blank=True)
    data_dir = models.TextField(help_text="Base data directory ({data_dir}).")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class SupervisorSettings(models.Model):
    """The [settings] table: one row, read by the supervisor on every config sync."""

    health_check_interval = models.FloatField(default=10)
    max_restarts = models.PositiveIntegerField(default=3)
    restart_window = models.FloatField(default=300)
    backoff_base_ms = models.PositiveIntegerField(default=1000)
    backoff_max_ms = models.PositiveIntegerField(default=60_000)
    # Tenants' own uids come from this range when the supervisor runs as root.
    uid_range = models.CharField(max_length=32, default="200000-265535")
    # Loopback ports handed out as $PORT, one per running instance.
    port_range = models.CharField(max_length=32, default="30000-40000")
    config_path = models.TextField(blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "supervisor settings"

    def __str__(self) -> str:
        return f"settings from {self.config_path or 'defaults'}"

    @classmethod
    def current(cls) -> SupervisorSettings:
        return cls.objects.filter(pk=1).first() or cls(pk=1)


class Instance(models.Model):
    class Desired(models.TextChoices):
        RUNNING = "running"
        STOPPED = "stopped"

    class State(models.TextChoices):
        STOPPED = "stopped"
        STARTING = "starting"
        RUNNING = "running"
        STOPPING = "stopping"
        BACKOFF = "backoff"
        FAILED = "failed"

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="instances")
    instance_id = models.CharField(max_length=63, validators=[label_validator])
    desired_state = models.CharField(
        max_length=16, choices=Desired.choices, default=Desired.STOPPED
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.STOPPED)
    always_on = models.BooleanField(default=False, help_text="Never stopped for idleness.")
    restart_requested = models.BooleanField(default=False)
    pid = models.IntegerField(null=True, blank=True)
    # With pid, identifies our process across a supervisor crash even if the pid is reused.
    pid_create_time = models.FloatField(null=True, blank=True)
    socket_path = models.TextField(blank=True)
    # The loopback port given to the running process as $PORT (None when not running).
    port = models.IntegerField(null=True, blank=True)
    # The tenant's own uid (stable: its data dir belongs to it) and how it last ran.
    uid = models.IntegerField(null=True, blank=True, unique=True)
    isolation = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_activity = models.DateTimeField(null=True, blank=True)
    restart_count = models.PositiveIntegerField(default=0)
    last_exit_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    health_ok = models.BooleanField(null=True)
    health_checked_at = models.DateTimeField(null=True, blank=True)
    # Upstream's per-instance traffic share on the weighted host {service}.{domain}.
    weight = models.PositiveSmallIntegerField(default=100)
    # A pinned release (beta customers): wins over the service's weights; blank = follow.
    release = models.CharField(max_length=63, blank=True, validators=[label_validator])
    # The release its process last became healthy on: where a failed start falls back to.
    # (Written by the supervisor with .update(), so it never looks like an operator change.)
    last_release = models.CharField(max_length=63, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["service__name", "instance_id"]
        constraints = [
            models.UniqueConstraint(fields=["service", "instance_id"], name="unique_instance"),
        ]

    def __str__(self) -> str:
        return str(self.key)

    @property
    def key(self) -> InstanceKey:
        return InstanceKey(self.service.name, self.instance_id)

    def uptime_seconds(self, now: float | None = None) -> float | None:
        if self.state != self.State.RUNNING or self.started_at is None:
            return None
        return max(0.0, (now or time.time()) - self.started_at.timestamp())

    def idle_seconds(self, now: float | None = None) -> float | None:
        if self.state != self.State.RUNNING or self.last_activity is None:
            return None
        return max(0.0, (now or time.time()) - self.last_activity.timestamp())


class Event(models.Model):
    """One lifecycle transition or notable happening, for the dashboard and `ps`."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="events")
    time = models.DateTimeField(auto_now_add=True, db_index=True)
    kind = models.CharField(max_length=32)
    from_state = models.CharField(max_length=16, blank=True)
    to_state = models.CharField(max_length=16, blank=True)
    message = models.TextField(blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class LogLine(models.Model):
    class Stream(models.TextChoices):
        STDOUT = "stdout"
        STDERR = "stderr"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="log_lines")
    stream = models.CharField(max_length=6, choices=Stream.choices)
    time = models.DateTimeField()
    text = models.TextField()

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["instance", "id"], name="logline_instance_id")]

    def __str__(self) -> str:
        return self.text


class SupervisorHeartbeat(models.Model):
    """Lets the CLI tell "no supervisor is running" from "the supervisor is slow"."""

    pid = models.IntegerField()
    hostname = models.CharField(max_length=255)
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"supervisor pid {self.pid}"


class ApiToken(models.Model):
    """A bearer token for the REST API. Only a SHA-256 of the token is stored.

    Tokens are 32 random bytes, so a fast hash is enough (nothing to brute-force, unlike
    a password); the non-secret prefix finds the row without scanning.
    """

    class Scope(models.TextChoices):
        READ = "read"
        WRITE = "write"
        ADMIN = "admin"

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=16, unique=True)
    digest = models.CharField(max_length=64)
    scope = models.CharField(max_length=8, choices=Scope.choices, default=Scope.READ)
    tenant = models.CharField(
        max_length=63,
        blank=True,
        validators=[label_validator],
        help_text="If set, the token sees and acts on this tenant's instances only.",
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.scope})"


class Release(models.Model):
    """One version of a multi-tenant service: overrides on top of its definition.

    The service's own definition is its first release (made when the second is created).
    Releases share tenant data: a tenant moves between them, never runs on two at once.
    """

    class State(models.TextChoices):
        ACTIVE = "active"
        DRAINING = "draining"  # weight 0 after a switch away; tenants move off as they wake
        RETIRED = "retired"
        FAILED = "failed"

    service = models.ForeignKey(Service, on_delete=models.CASCADE, related_name="releases")
    name = models.CharField(max_length=63, validators=[label_validator])
    # Blank or null: the service's own value.
    command = models.TextField(blank=True)
    args = models.JSONField(null=True, blank=True)
    env = models.JSONField(default=dict, blank=True)  # merged over the service's env
    health = models.CharField(max_length=255, blank=True)
    weight = models.PositiveSmallIntegerField(default=0)
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True, db_index=True)

    class Meta:
        ordering = ["service__name", "created_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["service", "name"], name="unique_release"),
        ]

    def __str__(self) -> str:
        return f"{self.service.name}@{self.name}"


class ReleaseChange(models.Model):
    """The audit trail of releases and weights: who changed what, from what, to what."""

    service = models.CharField(max_length=63, db_index=True)
    release = models.CharField(max_length=63, blank=True)
    instance = models.CharField(max_length=63, blank=True)  # a pin or an instance weight
    kind = models.CharField(max_length=32)
    actor = models.CharField(max_length=150, blank=True)
    from_value = models.CharField(max_length=255, blank=True)
    to_value = models.CharField(max_length=255, blank=True)
    message = models.TextField(blank=True)
    time = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.kind} {self.service}: {self.from_value} -> {self.to_value}"
