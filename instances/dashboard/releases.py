"""Releases and weights: the controls, disabled until releases exist (a later issue)."""

from __future__ import annotations

from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from instances.dashboard.access import nav_context, staff_page
from instances.models import Service


@staff_page
def releases(request: HttpRequest) -> HttpResponse:
    services = Service.objects.annotate(n_instances=Count("instances")).order_by("name")
    context = nav_context("releases", services=services)
    return render(request, "dashboard/releases.html", context)
