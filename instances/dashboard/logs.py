"""Log search: a GET form over instances.logsearch.search(), paged by id (keyset).

Keyset paging ("older than line N") costs the same on the last page as on the first,
however many lines are stored; an OFFSET would not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse, QueryDict
from django.shortcuts import render
from django.utils.safestring import SafeString, mark_safe

from instances import logsearch
from instances.dashboard.access import nav_context, staff_page
from instances.ids import InvalidName, parse_key
from instances.models import Instance

PAGE = 50
ORDERS = {"newest": "newest", "ranked": "rank"}  # the form's words -> search()'s
LOCAL_FORMAT = "%Y-%m-%dT%H:%M"  # what <input type="datetime-local"> sends and shows


class SearchForm(forms.Form):
    q = forms.CharField(required=False, max_length=logsearch.MAX_QUERY_CHARS, label="Search")
    instance = forms.CharField(required=False, max_length=127, label="Instance (service:id)")
    stream = forms.ChoiceField(
        required=False, choices=[("", "all"), ("stdout", "stdout"), ("stderr", "stderr")]
    )
    since = forms.DateTimeField(
        required=False,
        label="From (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format=LOCAL_FORMAT),
    )
    until = forms.DateTimeField(
        required=False,
        label="Until (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format=LOCAL_FORMAT),
    )
    order = forms.ChoiceField(
        required=False, choices=[("newest", "newest first"), ("ranked", "best match first")]
    )
    before = forms.IntegerField(
        required=False, min_value=1, max_value=2**62, widget=forms.HiddenInput
    )

    def clean_instance(self) -> Instance | None:
        raw = self.cleaned_data["instance"].strip()
        if not raw:
            return None
        try:
            key = parse_key(raw)
        except InvalidName as e:
            raise forms.ValidationError(str(e)) from None
        found = Instance.objects.filter(service__name=key.service, instance_id=key.instance_id)
        if (instance := found.first()) is None:
            raise forms.ValidationError(f"{key} is not registered.")
        return instance

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        since, until = data.get("since"), data.get("until")
        for name in ("since", "until"):
            if data.get(name) and not in_range(data[name]):
                self.add_error(name, "Is out of range.")
        if since and until and since >= until:
            self.add_error("until", "Must be later than From.")
        if data.get("before") and self.effective_order() == "ranked":
            self.add_error("order", "Paging needs newest first.")
        return data

    def effective_order(self) -> str:
        q = (self.cleaned_data.get("q") or "").strip()
        # Without words there is nothing to rank: a listing is always newest first.
        return (self.cleaned_data.get("order") or "newest") if q else "newest"


def in_range(value: datetime) -> bool:
    try:
        value.astimezone(UTC)  # the search works in UTC: year 1 at +01:00 cannot be
    except (OverflowError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Row:
    id: int
    time: datetime
    key: str
    stream: str
    snippet: SafeString


@staff_page
def search(request: HttpRequest) -> HttpResponse:
    form = SearchForm(request.GET or None, auto_id="%s")
    context = nav_context("logs", form=form, searched=bool(request.GET))
    if form.is_bound and form.is_valid():
        try:
            context.update(run(form))
        except logsearch.SearchError as e:
            context["error"] = str(e)
    return render(request, "dashboard/logs.html", context)


def run(form: SearchForm) -> dict[str, Any]:
    data = form.cleaned_data
    instance = data["instance"]
    order = form.effective_order()
    hits = logsearch.search(
        data["q"].strip() or None,
        instance_ids=[instance.pk] if instance else None,
        stream=data["stream"] or None,
        since=data["since"],
        until=data["until"],
        # One more than a page: whether there is an older page, without a count.
        limit=PAGE + 1,
        order=ORDERS[order],
        before_id=data["before"],
    )
    rows = to_rows(hits[:PAGE])
    more = len(hits) > PAGE
    return {
        "ran": True,
        "rows": rows,
        "older": page_query(form, before=str(rows[-1].id)) if more and order == "newest" else "",
        "as_newest": page_query(form, order="newest") if more and order == "ranked" else "",
        "first_page": page_query(form) if data["before"] else "",
    }


def to_rows(hits: list[logsearch.Hit]) -> list[Row]:
    instances = Instance.objects.select_related("service").in_bulk({h.instance_id for h in hits})
    return [
        Row(
            hit.id,
            hit.time,
            str(instances[hit.instance_id].key) if hit.instance_id in instances else "",
            hit.stream,
            # Safe only because logsearch escapes the line and adds nothing but <mark>.
            mark_safe(hit.snippet),
        )
        for hit in hits
    ]


def page_query(form: SearchForm, **changes: str) -> str:
    """The form's query string without `before`, plus changes: links keep the filters."""
    query = QueryDict(mutable=True)
    query.update({k: v for k, v in form.data.items() if k != "before" and v})
    query.update(changes)
    return query.urlencode()
