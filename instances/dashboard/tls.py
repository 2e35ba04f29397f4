"""The HTTPS page: every certificate (names, issuer, expiry, next renewal, last error)
and tenants' custom domains (add, remove)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from instances.dashboard.access import nav_context, staff_page
from instances.ids import InvalidName, parse_key
from instances.models import Instance
from proxy.tls.api import status as tls_status
from routing import domains
from routing.models import Domain


class DomainForm(forms.Form):
    name = forms.CharField(max_length=253, help_text="e.g. notes.alice-corp.com")
    instance = forms.CharField(max_length=130, help_text="SERVICE:ID, e.g. notes:alice")
    verification = forms.ChoiceField(
        choices=[("none", "none: route at once"), ("txt", "TXT record first")],
        initial="none",
        help_text="TXT: routed once the record shown below is published and verified.",
    )

    def add(self) -> Domain | None:
        """The new domain, or None with the reason in the form's errors."""
        try:
            key = parse_key(self.cleaned_data["instance"])
        except InvalidName as e:
            self.add_error("instance", str(e))
            return None
        instance = Instance.objects.filter(
            service__name=key.service, instance_id=key.instance_id
        ).first()
        if instance is None:
            self.add_error("instance", f"{key} is not registered")
            return None
        try:
            return domains.add(
                self.cleaned_data["name"],
                instance,
                key,
                settings.TENEMENT_DOMAIN,
                self.cleaned_data["verification"],
            )
        except domains.DomainError as e:
            self.add_error("name", str(e))
            return None


@staff_page
def tls(request: HttpRequest) -> HttpResponse:
    form = DomainForm(request.POST if request.method == "POST" else None)
    if form.is_bound and form.is_valid() and (added := form.add()) is not None:
        target = form.cleaned_data["instance"]
        if added.routed:
            messages.success(request, f"{added.name} now routes to {target}.")
        else:
            messages.success(request, f"{added.name} added for {target}: publish its TXT record.")
        return redirect("dashboard:tls")
    return render(request, "dashboard/tls.html", page_context(form))


def page_context(form: DomainForm) -> dict[str, Any]:
    rows = Domain.objects.select_related("instance__service").order_by("name")
    return nav_context("tls", form=form, status=tls_status(), domains=rows)


@staff_page
@require_POST
def remove_domain(request: HttpRequest, name: str) -> HttpResponse:
    domain = Domain.objects.filter(name=name).first()
    if domain is None:
        messages.error(request, f"No custom domain {name!r}.")
    else:
        domains.remove(domain)
        messages.success(request, f"Removed {name}: it is no longer routed.")
    return redirect("dashboard:tls")


@staff_page
@require_POST
def verify_domain(request: HttpRequest, name: str) -> HttpResponse:
    domain = Domain.objects.filter(name=name).first()
    if domain is None:
        messages.error(request, f"No custom domain {name!r}.")
        return redirect("dashboard:tls")
    try:
        domains.verify(domain)
    except domains.DomainError as e:
        messages.error(request, f"Not verified: {e}.")
    else:
        messages.success(request, f"{name} verified: it is routed now.")
    return redirect("dashboard:tls")
