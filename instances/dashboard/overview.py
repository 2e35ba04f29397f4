"""Overview page: counts, each service's instances (50 a page), actions, add tenant.

The page and its live WebSocket (consumers.py) build rows with the same functions and
render the same partial, templates/dashboard/_instance_rows.html.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.core.paginator import Page, Paginator
from django.db.models import Count, QuerySet
from django.http import (
    Http404,
    HttpRequest,
    HttpResponse,
    HttpResponseBadRequest,
    HttpResponseRedirect,
    QueryDict,
)
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from instances import operations as ops
from instances.api.serializers import live_process
from instances.dashboard.access import nav_context, staff_page
from instances.dashboard.display import actions_for, human_seconds, state_label, tenant_url
from instances.dashboard.forms import AddTenantForm
from instances.ids import InvalidName, parse_key
from instances.models import Instance, Service

PAGE_SIZE = 50
STATES = [value for value, _ in Instance.State.choices]
# (value, label) for the state filter: "sleeping" for stopped, as everywhere on the page.
STATE_CHOICES = [(value, state_label(value)) for value in STATES]
ROWS_TEMPLATE = "dashboard/_instance_rows.html"
# (series in the charts' JSON, title, unit) of the overview's charts.
OVERVIEW_CHARTS = (
    ("req_per_s", "Requests", "req/s"),
    ("wakes", "Wakes", "per step"),
    ("running", "Instances running", "instances"),
)


@dataclass(frozen=True)
class Filters:
    """What the overview shows: the query string of the page and of its WebSocket."""

    q: str = ""
    service: str = ""
    state: str = ""
    page: str = "1"

    @classmethod
    def from_query(cls, params: QueryDict) -> Filters:
        state = params.get("state", "")
        return cls(
            q=params.get("q", "").strip().lower()[:63],
            service=params.get("service", "").strip()[:63],
            state=state if state in STATES else "",
            page=params.get("page", "1")[:9],
        )

    @property
    def active(self) -> bool:
        return bool(self.q or self.service or self.state)

    def querystring(self, page: int | str | None = None) -> str:
        values = {**asdict(self), "page": page or self.page}
        if str(values["page"]) == "1":
            del values["page"]
        return urlencode({k: v for k, v in values.items() if v})


@dataclass(frozen=True)
class Row:
    """One instance as the overview shows it."""

    key: str
    instance_id: str
    service: str
    state: str
    desired: str
    uptime: str
    idle: str
    restarts: int
    rss: int | None
    cpu: str
    last_error: str

    @classmethod
    def of(cls, instance: Instance, now: float) -> Row:
        proc = live_process(instance)
        return cls(
            key=str(instance.key),
            instance_id=instance.instance_id,
            service=instance.service.name,
            state=instance.state,
            desired=instance.desired_state,
            uptime=human_seconds(instance.uptime_seconds(now)),
            idle=human_seconds(instance.idle_seconds(now)),
            restarts=instance.restart_count,
            rss=proc.memory_info().rss if proc else None,
            cpu=f"{proc.cpu_percent(interval=None):.1f}%" if proc else "—",
            last_error=instance.last_error[:300],
        )

    @property
    def label(self) -> str:
        return state_label(self.state)

    @property
    def actions(self) -> tuple[str, ...]:
        return actions_for(self.state)

    @property
    def wants_other(self) -> bool:
        """Settled one way, asked for the other: the supervisor has not acted yet."""
        return self.state in ("running", "stopped") and self.state != self.desired


def counts() -> dict[str, int]:
    """All instances by state, in one query. Sleeping = stopped: the next request wakes it."""
    grouped = Instance.objects.order_by().values("state").annotate(n=Count("id"))
    by_state = {row["state"]: row["n"] for row in grouped}
    return {
        "registered": sum(by_state.values()),
        "running": by_state.get("running", 0),
        "sleeping": by_state.get("stopped", 0),
        "starting": by_state.get("starting", 0),
        "backoff": by_state.get("backoff", 0),
        "failed": by_state.get("failed", 0),
    }


def matching(filters: Filters) -> QuerySet[Instance]:
    qs = Instance.objects.select_related("service").order_by("service__name", "instance_id")
    if filters.q:
        qs = qs.filter(instance_id__contains=filters.q)
    if filters.service:
        qs = qs.filter(service__name=filters.service)
    if filters.state:
        qs = qs.filter(state=filters.state)
    return qs


def rows_context(filters: Filters, now: float | None = None) -> dict[str, Any]:
    """What _instance_rows.html needs: only the visible page, grouped by service."""
    page: Page = Paginator(matching(filters), PAGE_SIZE).get_page(filters.page)
    now = now or time.time()
    rows = [Row.of(instance, now) for instance in page.object_list]
    groups = [(service, list(group)) for service, group in groupby(rows, lambda r: r.service)]
    return {
        "groups": groups,
        "page": page,
        "filters": filters,
        "prev_query": filters.querystring(page.number - 1) if page.has_previous() else "",
        "next_query": filters.querystring(page.number + 1) if page.has_next() else "",
        "next_url": overview_url(filters, page.number),
    }


def overview_url(filters: Filters, page: int | None = None) -> str:
    query = filters.querystring(page)
    return reverse("dashboard:overview") + (f"?{query}" if query else "")


def render_rows(filters: Filters, csrf_token: str) -> str:
    """The live update's HTML: the same partial as the page, with the client's CSRF token."""
    return render_to_string(ROWS_TEMPLATE, {**rows_context(filters), "csrf_token": csrf_token})


@staff_page
def overview(request: HttpRequest) -> HttpResponse:
    filters = Filters.from_query(request.GET)
    context = nav_context(
        "overview",
        counts=counts(),
        services=Service.objects.values_list("name", flat=True),
        states=STATE_CHOICES,
        overview_charts=OVERVIEW_CHARTS,
        charts_url=reverse("dashboard:charts-overview"),
        grafana_url=settings.TENEMENT_GRAFANA_URL,
        **rows_context(filters),
    )
    return render(request, "dashboard/overview.html", context)


# ---- add tenant -------------------------------------------------------------------------


@staff_page
def add_tenant(request: HttpRequest) -> HttpResponse:
    form = AddTenantForm(request.POST or None)
    if request.method == "POST" and form.is_valid() and (instance := form.save()):
        verb = "registered and starting" if form.cleaned_data["start"] else "registered"
        messages.success(request, f"{instance.key} {verb}.")
        return redirect(reverse("dashboard:add-tenant") + f"?created={instance.key}")
    context = nav_context("overview", form=form, **created_context(request))
    return render(request, "dashboard/add_tenant.html", context)


def created_context(request: HttpRequest) -> dict[str, Any]:
    """After a successful add (redirected here): the new tenant and its URL."""
    try:
        instance = ops.get_instance(request.GET.get("created", ""))
    except (InvalidName, ops.OperationError):
        return {}
    return {"created": instance, "tenant_url": tenant_url(request, instance)}


# ---- actions ----------------------------------------------------------------------------

ACTIONS: dict[str, tuple[Callable[[str], Instance], str]] = {
    "start": (ops.request_start, "Starting {key}."),
    "stop": (ops.request_stop, "Stopping {key}."),
    "restart": (ops.request_restart, "Restarting {key}."),
    "deregister": (ops.deregister, "Deregistered {key}; its data directory is kept."),
}


@staff_page
@require_POST
def instance_action(request: HttpRequest, key: str) -> HttpResponse:
    action = request.POST.get("action", "")
    if action not in ACTIONS:
        expected = ", ".join(ACTIONS)
        return HttpResponseBadRequest(
            f"unknown action {action!r}: expected one of {expected}\n", content_type="text/plain"
        )
    operation, done = ACTIONS[action]
    try:
        instance = operation(str(parse_key(key)))
    except (InvalidName, ops.OperationError) as e:
        raise Http404(str(e)) from None
    messages.success(request, done.format(key=instance.key))
    return HttpResponseRedirect(back_to(request, key, gone=action == "deregister"))


def back_to(request: HttpRequest, key: str, gone: bool) -> str:
    """The page the action came from; never a foreign site, nor a deregistered detail page."""
    target = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    detail = reverse("dashboard:detail", args=[key])
    if not safe or not target.startswith("/") or (gone and target.startswith(detail)):
        return reverse("dashboard:overview")
    return target
