from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_POST

from instances.dashboard.access import nav_context, staff_page


@staff_page
def tokens(request: HttpRequest) -> HttpResponse:
    return render(request, "dashboard/tokens.html", nav_context(request, "tokens"))


@staff_page
@require_POST
def revoke(request: HttpRequest, name: str) -> HttpResponse:
    raise NotImplementedError
