from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from instances.dashboard.access import nav_context, staff_page


@staff_page
def detail(request: HttpRequest, key: str) -> HttpResponse:
    return render(request, "dashboard/detail.html", nav_context(request, "overview"))
