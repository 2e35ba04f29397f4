"""The data behind the dashboard's charts: the in-memory last hour (instances/timeline.py)
as uPlot's columns. Polled by static/dashboard/charts.js every step."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

from instances import timeline
from instances.dashboard.access import staff_page
from instances.dashboard.detail import instance_or_404

NO_STORE = {"Cache-Control": "no-store"}


@staff_page
def overview(request: HttpRequest) -> JsonResponse:
    return JsonResponse(timeline.current().overview_data(), headers=NO_STORE)


@staff_page
def instance(request: HttpRequest, key: str) -> JsonResponse:
    found = instance_or_404(key)
    return JsonResponse(timeline.current().instance_data(found.key), headers=NO_STORE)
