"""Releases and weights: sliders with a live preview, blue-green switch, rollback, pins."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from instances import metrics
from instances.dashboard.access import nav_context, staff_page
from instances.ids import InvalidName, parse_key
from instances.models import ReleaseChange, Service
from routing import operations as ops

CHANGES_SHOWN = 10


@staff_page
def releases(request: HttpRequest) -> HttpResponse:
    rates = metrics.release_error_rates()
    cards = [card(service, rates) for service in Service.objects.order_by("name")]
    return render(request, "dashboard/releases.html", nav_context("releases", cards=cards))


def card(service: Service, rates: dict[tuple[str, str], tuple[float, float]]) -> dict[str, Any]:
    rows = ops.summary(service)
    for row in rows:
        total, errors = rates.get((service.name, row["name"]), (0.0, 0.0))
        row["requests"] = int(total)
        row["error_rate"] = f"{100 * errors / total:.1f}%" if total else "—"
    changes = ReleaseChange.objects.filter(service=service.name)
    return {
        "service": service,
        "releases": rows,
        "tenants": service.instances.count(),
        "changes": list(changes[:CHANGES_SHOWN]),
        "can_roll_back": changes.filter(kind__in=("switch", "rollback")).exists(),
    }


def actor(request: HttpRequest) -> str:
    return getattr(request.user, "username", "") or "dashboard"


@staff_page
@require_POST
def release_action(request: HttpRequest, service: str) -> HttpResponse:
    """weight, switch, rollback or retire, from the releases page's forms."""
    action, name = request.POST.get("action", ""), request.POST.get("release", "")
    who = actor(request)
    try:
        if action == "weight":
            weight = request.POST.get("weight", "")
            if not weight.isdigit():
                raise ops.ReleaseError(f"weight must be a whole number from 0 to 100: {weight!r}")
            ops.set_weight(service, name, int(weight), who)
            done = f"{service} release {name}: weight {weight}"
        elif action == "switch":
            ops.switch(service, name, who)
            done = f"{service}: switched to {name}; tenants move as the supervisor drains them"
        elif action == "rollback":
            back = ops.rollback(service, who)
            done = f"{service}: rolled back to {back.name}"
        elif action == "retire":
            ops.retire(service, name, who)
            done = f"{service} release {name} retired"
        else:
            raise ops.ReleaseError(f"unknown action {action!r}")
    except ops.NotFoundError as e:
        raise Http404(str(e)) from None
    except ops.ReleaseError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, done)
    return HttpResponseRedirect(reverse("dashboard:releases") + f"#release-{service}")


@staff_page
@require_POST
def pin(request: HttpRequest, key: str) -> HttpResponse:
    """Pin (or unpin, with no release) a tenant from its instance page."""
    name = request.POST.get("release", "")
    try:
        parsed = parse_key(key)
        ops.pin(parsed, name, actor(request))
    except (InvalidName, ops.NotFoundError) as e:
        raise Http404(str(e)) from None
    except ops.ReleaseError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, f"{key} pinned to {name}" if name else f"{key} unpinned")
    return HttpResponseRedirect(reverse("dashboard:detail", args=[key]))
