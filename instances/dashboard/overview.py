from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from instances.dashboard.access import nav_context, staff_page


@staff_page
def overview(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/overview.html", nav_context(request, "overview"))


@staff_page
def add_tenant(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/add_tenant.html", nav_context(request, "overview"))


@staff_page
@require_POST
def instance_action(request: HttpRequest, key: str) -> HttpResponse:
    raise NotImplementedError
