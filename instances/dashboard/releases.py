from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from instances.dashboard.access import nav_context, staff_page


@staff_page
def releases(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/releases.html", nav_context(request, "releases"))
