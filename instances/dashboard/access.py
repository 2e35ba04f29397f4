from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpResponse

View = Callable[..., HttpResponse]


def staff_page(view: View) -> View:
    """Every dashboard page: staff login required, redirect to our own login page."""
    return staff_member_required(view, login_url="dashboard:login")


def nav_context(active: str, **extra: Any) -> dict[str, Any]:
    """What base.html needs: which nav entry is current."""
    return {"active": active, **extra}
