"""Instance detail: state, health, data dir, lifecycle events, the last log lines.

The live tail is static/dashboard/detail.js on the API's SSE stream (/api/logs/stream),
so this view only renders what is stored at load time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import reverse

from instances import operations as ops
from instances.dashboard.access import nav_context, staff_page
from instances.dashboard.display import actions_for, human_seconds, state_label, tenant_url
from instances.ids import InvalidName
from instances.models import Instance
from instances.spec import ServiceSpec

# (series in the charts' JSON, title, unit) of the instance page's charts.
INSTANCE_CHARTS = (
    ("requests", "Requests", "per step"),
    ("p95_ms", "p95 latency", "ms"),
    ("wake_ms", "Wake duration", "ms"),
    ("rss_mb", "Memory (RSS)", "MiB"),
)
TAIL_LINES = 200
EVENTS = 50
# A data dir can hold millions of files: the page must not wait on walking them all.
SIZE_MAX_ENTRIES = 10_000
SIZE_MAX_SECONDS = 0.2
# (action, button label, confirmation question or "" for none): the overview's handler.
ACTIONS = (
    ("start", "Start", ""),
    ("restart", "Restart", ""),
    ("stop", "Stop", "Stop this instance? Requests will wake it again."),
    ("deregister", "Deregister", "Deregister this instance? Its process is stopped."),
)


@dataclass(frozen=True)
class DirSize:
    bytes: int
    entries: int
    complete: bool  # False: the walk stopped at a cap, so `bytes` is a lower bound
    exists: bool


@staff_page
def detail(request: HttpRequest, key: str) -> HttpResponse:
    instance = instance_or_404(key)
    spec = ServiceSpec.from_model(instance.service)
    data_dir = spec.instance_dir(instance.instance_id)
    lines = last_lines(instance)
    context = nav_context(
        "overview",
        instance=instance,
        key=str(instance.key),
        uptime=human_seconds(instance.uptime_seconds()),
        idle=human_seconds(instance.idle_seconds()),
        socket_path=instance.socket_path or spec.socket_path(instance.instance_id),
        data_dir=data_dir,
        # How it last started (level, uid, limits); before a first start, what is set.
        isolation_configured=f"{spec.isolation} (not started yet)",
        data_size=dir_size(data_dir),
        tenant_url=tenant_url(request, instance),
        events=list(instance.events.order_by("-id")[:EVENTS]),
        lines=lines,
        last_id=lines[-1].id if lines else 0,
        actions=[a for a in ACTIONS if a[0] in actions_for(instance.state)],
        state_label=state_label(instance.state),
        instance_charts=INSTANCE_CHARTS,
        charts_url=reverse("dashboard:charts-instance", args=[str(instance.key)]),
        grafana_url=settings.TENEMENT_GRAFANA_URL,
        releases=list(instance.service.releases.exclude(state="retired").order_by("created_at")),
    )
    return render(request, "dashboard/detail.html", context)


def instance_or_404(key: str) -> Instance:
    try:
        return ops.get_instance(key)
    except (InvalidName, ops.OperationError) as e:
        raise Http404(str(e)) from None


def last_lines(instance: Instance) -> list[Any]:
    """The newest TAIL_LINES lines, oldest first (as a terminal shows them)."""
    newest = instance.log_lines.order_by("-id")[:TAIL_LINES]
    return list(reversed(newest))


def dir_size(root: Path, max_entries: int = SIZE_MAX_ENTRIES) -> DirSize:
    """Apparent size of everything under root, without following symlinks, capped."""
    if not os.path.isdir(root):
        return DirSize(0, 0, True, False)
    deadline = time.monotonic() + SIZE_MAX_SECONDS
    total = entries = 0
    pending = [str(root)]
    while pending:
        for entry in _scan(pending.pop()):
            # Checked per entry: one directory alone may hold a million files.
            if entries >= max_entries or time.monotonic() > deadline:
                return DirSize(total, entries, False, True)
            entries += 1
            if _is_dir(entry):
                pending.append(entry.path)
            else:  # a directory's own size is file-system bookkeeping, not data
                total += _size(entry)
    return DirSize(total, entries, True, True)


def _scan(path: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from it
    except OSError:  # vanished or unreadable: count what we could read
        return


def _size(entry: os.DirEntry[str]) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
