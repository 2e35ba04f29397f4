"""Idempotent sync of a validated config into the database (the desired state)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from instances.config import ConfigError, LoadedConfig
from instances.models import Instance, Release, ReleaseChange, Service, SupervisorSettings

SETTINGS_FIELDS = (
    "health_check_interval",
    "max_restarts",
    "restart_window",
    "backoff_base_ms",
    "backoff_max_ms",
    "uid_range",
    "port_range",
)


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    not_in_file: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"services: {len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged",
            f"instances: {len(self.registered)} newly registered",
        ]
        out += [f"  changed service {name}" for name in self.updated]
        out += [f"  registered {key}" for key in self.registered]
        if self.not_in_file:
            out.append(
                "kept (defined in the database but not in this file): "
                + ", ".join(self.not_in_file)
            )
        return out


@transaction.atomic
def apply_config(config: LoadedConfig) -> SyncReport:
    """Make the database match the file. Running it twice changes nothing the second time."""
    report = SyncReport()
    _apply_settings(config)
    for name, fields in config.services.items():
        service = _upsert_service(name, fields, report)
        for instance_id in config.instance_ids(name):
            _register(service, instance_id, instance_id in config.always_on[name], report)
        _apply_pins(config, service)
    report.not_in_file = list(
        Service.objects.exclude(name__in=config.services).values_list("name", flat=True)
    )
    return report


def _apply_settings(config: LoadedConfig) -> None:
    current = SupervisorSettings.current()
    wanted: dict[str, Any] = {f: getattr(config.settings, f) for f in SETTINGS_FIELDS}
    wanted["config_path"] = str(config.path)
    if current.pk and all(getattr(current, k) == v for k, v in wanted.items()):
        return
    for key, value in wanted.items():
        setattr(current, key, value)
    current.save()


def _upsert_service(name: str, fields: dict[str, Any], report: SyncReport) -> Service:
    service = Service.objects.filter(name=name).first()
    if service is None:
        report.created.append(name)
        return Service.objects.create(name=name, **fields)
    changed = [k for k, v in fields.items() if getattr(service, k) != v]
    if not changed:
        report.unchanged.append(name)
        return service
    for key in changed:
        setattr(service, key, fields[key])
    # save() bumps updated_at, which is how a running supervisor notices.
    service.save()
    report.updated.append(name)
    return service


def _register(service: Service, instance_id: str, always_on: bool, report: SyncReport) -> None:
    instance, created = Instance.objects.get_or_create(
        service=service,
        instance_id=instance_id,
        defaults={"desired_state": Instance.Desired.RUNNING, "always_on": always_on},
    )
    if created:
        report.registered.append(str(instance.key))
    elif instance.always_on != always_on:
        instance.always_on = always_on
        instance.save(update_fields=["always_on", "updated_at"])


def _apply_pins(config: LoadedConfig, service: Service) -> None:
    """ "ID@RELEASE" in [instances] pins the tenant; an entry without one leaves any pin made
    through the API or the dashboard alone. A pin to a release that does not exist is
    refused (the whole sync is rolled back)."""
    pins = config.pins.get(service.name, {})
    if not pins:
        return
    known = dict(Release.objects.filter(service=service).values_list("name", "state"))
    for instance_id, release in pins.items():
        if known.get(release) not in ("active", "draining"):
            what = f"is {known[release]}" if release in known else "does not exist"
            raise ConfigError(
                str(config.path),
                [
                    f"instances.{service.name}: {instance_id}@{release}: release {release!r} "
                    f"{what} (releases: {', '.join(known) or 'none'}); create it first "
                    "(ten release create) or drop the @"
                ],
            )
        instance = Instance.objects.get(service=service, instance_id=instance_id)
        if instance.release != release:
            ReleaseChange.objects.create(
                service=service.name,
                kind="pin",
                actor="config",
                release=release,
                instance=instance_id,
                from_value=instance.release,
                to_value=release,
            )
            instance.release = release
            instance.save(update_fields=["release", "updated_at"])


def start_config_instances(config: LoadedConfig) -> int:
    """At boot, [instances] are wanted running (failed ones stay failed until a manual start)."""
    started = 0
    for name in config.services:
        started += (
            Instance.objects.filter(service__name=name, instance_id__in=config.instance_ids(name))
            .exclude(state=Instance.State.FAILED)
            .update(desired_state=Instance.Desired.RUNNING)
        )
    return started
