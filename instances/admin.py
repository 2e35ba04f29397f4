from __future__ import annotations

from django.contrib import admin

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


@admin.register(Release)
class ReleaseAdmin(admin.ModelAdmin):
    """Read-only here: changes go through the API, `ten` or /releases/, which audit them."""

    list_display = ("__str__", "weight", "state", "created_by", "created_at")
    list_filter = ("state", "service")

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(ReleaseChange)
class ReleaseChangeAdmin(admin.ModelAdmin):
    list_display = ("time", "service", "kind", "release", "instance", "from_value", "to_value")
    list_filter = ("kind", "service")

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ("time", "instance", "kind", "from_state", "to_state", "message")
    list_filter = ("kind",)


@admin.register(LogLine)
class LogLineAdmin(admin.ModelAdmin):
    list_display = ("time", "instance", "stream", "text")
    list_filter = ("stream",)
