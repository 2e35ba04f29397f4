from __future__ import annotations

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from instances.models import Instance


def home(request: HttpRequest) -> HttpResponse:
    """A plain status page on the control host until the dashboard arrives."""
    counts = dict(Instance.objects.values_list("state").annotate(n=Count("pk")))
    return render(request, "home.html", {"counts": counts, "total": sum(counts.values())})
