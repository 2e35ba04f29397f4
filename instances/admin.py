from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from instances.models import Event, Instance, LogLine, Release, ReleaseChange, Service


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    list_display = ("name", "command", "health", "idle_timeout", "source")
    search_fields = ("name",)


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ("__str__", "desired_state", "state", "pid", "restart_count", "always_on")
    list_filter = ("state", "desired_state", "service")
    search_fields = ("instance_id",)
    # Actual state belongs to the supervisor; operators change desired state only.
    readonly_fields = (
        "state",
        "pid",
        "pid_create_time",
        "socket_path",
        "started_at",
        "last_activity",
        "restart_count",
        "last_exit_code",
        "last_error",
        "health_ok",
        "health_checked_at",
        "last_release",
    )


class ReadOnlyAdmin(admin.ModelAdmin):
    """History and audit records (written by the supervisor, or by the API, which
    audits): to read and search, never to edit or add here. Deleting stays possible."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Release)
class ReleaseAdmin(ReadOnlyAdmin):
    """Read-only here: changes go through the API, `ten` or /releases/, which audit them."""

    list_display = ("__str__", "weight", "state", "created_by", "created_at")
    list_filter = ("state", "service")


@admin.register(ReleaseChange)
class ReleaseChangeAdmin(ReadOnlyAdmin):
    list_display = ("time", "service", "kind", "release", "instance", "from_value", "to_value")
    list_filter = ("kind", "service")


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ("time", "instance", "kind", "from_state", "to_state", "message")
    list_filter = ("kind",)
    list_select_related = ("instance__service",)


@admin.register(LogLine)
class LogLineAdmin(ReadOnlyAdmin):
    list_display = ("time", "instance", "stream", "text")
    list_filter = ("stream",)
    list_select_related = ("instance__service",)
