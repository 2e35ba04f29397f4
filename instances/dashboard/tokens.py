"""API tokens: list, create (the secret shown once), revoke.

The secret is rendered in the response to the create POST and nowhere else: not after a
redirect, not in the session, not in a message. Only its hash is stored.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from instances import tokens as token_ops
from instances.dashboard.access import nav_context, staff_page
from instances.models import ApiToken

PAGE = 50


class TokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Any text without '/'.")
    scope = forms.ChoiceField(choices=ApiToken.Scope.choices, initial=ApiToken.Scope.READ)
    tenant = forms.CharField(
        required=False,
        max_length=63,
        label="Tenant (optional)",
        help_text="Restricts the token to this tenant's instances.",
    )
    expires = forms.FloatField(
        required=False,
        min_value=0.0001,
        max_value=3650,
        label="Expires after days (optional)",
        help_text="Blank: never.",
    )

    def mint(self) -> token_ops.Minted | None:
        """The new token, or None with the reason added to the form's errors."""
        data = self.cleaned_data
        try:
            return token_ops.mint(data["name"], data["scope"], data["tenant"], data["expires"])
        except token_ops.TokenError as e:
            self.add_error(e.field, str(e))
            return None


@staff_page
def tokens(request: HttpRequest) -> HttpResponse:
    form = TokenForm(request.POST if request.method == "POST" else None)
    minted = form.mint() if form.is_bound and form.is_valid() else None
    if minted is not None:
        form = TokenForm()  # a clean form for the next one; the secret is shown above it
    response = render(request, "dashboard/tokens.html", page_context(request, form, minted))
    if minted is not None:
        # Keep the page with the secret out of the browser's and any proxy's cache.
        response["Cache-Control"] = "no-store"
    return response


def page_context(
    request: HttpRequest, form: TokenForm, minted: token_ops.Minted | None
) -> dict[str, Any]:
    page = Paginator(ApiToken.objects.order_by("name"), PAGE).get_page(request.GET.get("page"))
    return nav_context("tokens", form=form, minted=minted, page=page, now=timezone.now())


@staff_page
@require_POST
def revoke(request: HttpRequest, name: str) -> HttpResponse:
    try:
        token_ops.revoke(name)
    except token_ops.TokenError as e:
        messages.error(request, f"Could not revoke: {e}.")
    else:
        messages.success(request, f"Revoked token {name!r}. It no longer works.")
    return redirect("dashboard:tokens")
