"""All database access of the supervisor, as small plain functions.

They run on the supervisor's own threads (persist.py): reads on its reader thread,
writes through the ordered outbox. None of them is ever awaited by a lifecycle step.

Actual-state writes use queryset.update(), which does not bump updated_at, so
updated_at only moves when someone else (CLI, admin, API) changes desired state.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from instances.models import (
    Event,
    Instance,
    Release,
    ReleaseChange,
    Service,
    SupervisorHeartbeat,
    SupervisorSettings,
)
from routing.releases import ReleaseInfo


@dataclass
class Changes:
    instances: list[Instance]
    services: list[Service]
    instance_count: int
    settings: SupervisorSettings
    releases: dict[str, tuple[ReleaseInfo, ...]]


def _now() -> datetime:
    return timezone.now()


def load_instances() -> list[Instance]:
    return list(Instance.objects.select_related("service").order_by("pk"))


def load_settings() -> SupervisorSettings:
    return SupervisorSettings.current()


def fingerprint(recent: datetime) -> tuple[Any, ...]:
    """A cheap answer that changes whenever changes_since() would find something: a row
    added or removed (counts), a newer change (max updated_at), or a change committed
    late with an older stamp (the rows changed since `recent`, usually none). Polled
    every second instead of changes_since's ORM queries, which were most of an idle
    supervisor's CPU."""
    tables = [Instance._meta.db_table, Service._meta.db_table, Release._meta.db_table]
    with connection.cursor() as cursor:
        answer: list[Any] = []
        for table in tables:
            cursor.execute(f"SELECT count(*), max(updated_at) FROM {table}")
            answer += cursor.fetchone()
            cursor.execute(f"SELECT id, updated_at FROM {table} WHERE updated_at >= %s", [recent])
            answer.append(sorted(cursor.fetchall()))
        cursor.execute(f"SELECT max(updated_at) FROM {SupervisorSettings._meta.db_table}")
        answer += cursor.fetchone()
    return tuple(map(str, answer))


def changes_since(watermark: datetime) -> Changes:
    # The reader keeps its connection between polls (reopening SQLite every second, with
    # its PRAGMAs, was most of the idle supervisor's CPU); its thread drops the connection
    # after any database error, so one the server closed on us is replaced on the next poll.
    return Changes(
        instances=list(
            Instance.objects.select_related("service").filter(updated_at__gte=watermark)
        ),
        services=list(Service.objects.filter(updated_at__gte=watermark)),
        instance_count=Instance.objects.count(),
        settings=SupervisorSettings.current(),
        # Every release, on every sync: a handful of rows, and a change must reach running
        # tenants whatever its timestamp.
        releases=load_releases(),
    )


def load_releases() -> dict[str, tuple[ReleaseInfo, ...]]:
    out: dict[str, list[ReleaseInfo]] = {}
    for r in Release.objects.select_related("service").order_by("created_at", "id"):
        out.setdefault(r.service.name, []).append(release_info(r))
    return {service: tuple(found) for service, found in out.items()}


def release_info(r: Release) -> ReleaseInfo:
    return ReleaseInfo(
        name=r.name,
        weight=r.weight,
        state=r.state,
        command=r.command,
        args=tuple(r.args) if r.args is not None else None,
        env=tuple(sorted((r.env or {}).items())),
        health=r.health,
        version=r.updated_at.isoformat(),
    )


def release_fallback(pk: int, service: str, release: str, to: str, message: str) -> None:
    """The audit record of a failed start that fell back (the instance's event too)."""
    with transaction.atomic():
        instance = Instance.objects.filter(pk=pk).values_list("instance_id", flat=True).first()
        ReleaseChange.objects.create(
            service=service,
            release=release,
            instance=instance or "",
            kind="fallback",
            actor="supervisor",
            from_value=release,
            to_value=to,
            message=message[:2000],
        )


def leftovers() -> list[Instance]:
    """Rows a previous supervisor left mid-flight: they may still have live processes."""
    return list(
        Instance.objects.select_related("service").exclude(
            state__in=[Instance.State.STOPPED, Instance.State.FAILED], pid__isnull=True
        )
    )


def settle_leftover(pk: int, state: str) -> None:
    """After a restart nothing of ours runs: the row says stopped (or still failed)."""
    new = Instance.State.FAILED if state == Instance.State.FAILED else Instance.State.STOPPED
    Instance.objects.filter(pk=pk).update(state=new, pid=None, pid_create_time=None)


def update(pk: int, **fields: Any) -> None:
    Instance.objects.filter(pk=pk).update(**fields)


def update_if_unchanged(pk: int, version: datetime | None, **fields: Any) -> bool:
    """Conditional update: loses cleanly to a concurrent change by an operator."""
    return Instance.objects.filter(pk=pk, updated_at=version).update(**fields) == 1


def transition(pk: int, old: str, new: str, kind: str, message: str, **fields: Any) -> None:
    # One transaction: the outbox retries a write that failed, and a retry must not
    # apply the update (restart_count + 1) twice. A deregistered instance may still be
    # stopping: its row (and events) are gone.
    with transaction.atomic():
        if Instance.objects.filter(pk=pk).update(state=new, **fields):
            Event.objects.create(
                instance_id=pk, kind=kind, from_state=old, to_state=new, message=message[:2000]
            )


def record_event(pk: int, kind: str, message: str) -> None:
    if Instance.objects.filter(pk=pk).exists():
        Event.objects.create(instance_id=pk, kind=kind, message=message[:2000])


def save_activity(stamps: dict[int, float]) -> None:
    for pk, stamp in stamps.items():
        Instance.objects.filter(pk=pk).update(last_activity=datetime.fromtimestamp(stamp, UTC))


def clear_restart_request(pk: int) -> None:
    Instance.objects.filter(pk=pk).update(restart_requested=False)


def beat(started_at: datetime) -> None:
    SupervisorHeartbeat.objects.update_or_create(
        pk=1,
        defaults={
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "started_at": started_at,
            "beat_at": _now(),
        },
    )


def clear_heartbeat() -> None:
    SupervisorHeartbeat.objects.filter(pk=1, pid=os.getpid()).delete()
