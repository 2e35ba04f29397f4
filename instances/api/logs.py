"""Log search and the live log stream (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.db.models import QuerySet
from django.http import StreamingHttpResponse
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from instances.api.auth import tenant_of
from instances.api.params import bounded_int, int_param
from instances.ids import LABEL_RE, InvalidName, parse_key
from instances.models import Instance, LogLine

POLL_SECONDS = 0.5  # lines are written by the supervisor, maybe in another process
KEEPALIVE_SECONDS = 15.0
STREAM_BATCH = 500

# What each SSE event's `data:` holds.
LOG_EVENT = inline_serializer(
    "LogEvent",
    fields={
        "id": serializers.IntegerField(),
        "instance": serializers.CharField(),
        "stream": serializers.CharField(),
        "time": serializers.DateTimeField(),
        "text": serializers.CharField(),
    },
)

KEY = f"{LABEL_RE.pattern}:{LABEL_RE.pattern}"
FILTERS = [
    OpenApiParameter(
        "instance", {"type": "string", "pattern": f"^{KEY}$"}, description="SERVICE:ID"
    ),
    OpenApiParameter("stream", str, enum=["stdout", "stderr"]),
]


def scoped_instances(request: Request) -> QuerySet[Instance]:
    """The instances this caller may read, narrowed to ?instance= if given."""
    qs = Instance.objects.select_related("service")
    if tenant := tenant_of(request):
        qs = qs.filter(instance_id=tenant)
    if raw := request.query_params.get("instance"):
        try:
            key = parse_key(raw)
        except InvalidName as e:
            raise ValidationError({"instance": [str(e)]}) from None
        qs = qs.filter(service__name=key.service, instance_id=key.instance_id)
        if not qs.exists():
            raise NotFound(f"{key} is not registered")
    return qs


def stream_param(request: Request) -> str | None:
    stream = request.query_params.get("stream") or None
    if stream not in (None, "stdout", "stderr"):
        raise ValidationError({"stream": ["must be stdout or stderr"]})
    return stream


def time_param(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if not raw:
        return None
    try:
        value = parse_datetime(raw)
    except ValueError:
        value = None
    if value is None:
        raise ValidationError({name: ["must be an ISO 8601 time, e.g. 2026-11-22T10:00:00Z"]})
    try:
        value.astimezone(UTC)  # the search works in UTC: year 1 at +01:00 cannot be
    except (OverflowError, ValueError):
        raise ValidationError({name: ["is out of range"]}) from None
    return value


class LogSearchView(APIView):
    """Full-text search over captured output: words, "a phrase", -exclude."""

    @extend_schema(
        parameters=[
            *FILTERS,
            OpenApiParameter("q", str, description='words, "a phrase", -exclude'),
            OpenApiParameter("since", OpenApiTypes.DATETIME),
            OpenApiParameter("until", OpenApiTypes.DATETIME),
            int_param("limit", 1000, "default 100"),
            OpenApiParameter("order", str, enum=["rank", "newest"]),
            int_param("before", 2**62, "the next page: next_before of the last one"),
        ],
        responses=dict,
    )
    def get(self, request: Request) -> Response:
        from instances import logsearch

        instances = {i.pk: str(i.key) for i in scoped_instances(request)}
        q = request.query_params.get("q") or None
        # Without words there is nothing to rank: a listing is always newest first.
        order = (request.query_params.get("order") or "rank") if q else "newest"
        if order not in ("rank", "newest"):
            raise ValidationError({"order": ["must be rank or newest"]})
        if order == "rank" and request.query_params.get("before"):
            raise ValidationError({"before": ["paging needs order=newest"]})
        limit = bounded_int(request.query_params.get("limit"), 100, 1000, "limit")
        before = request.query_params.get("before")
        try:
            hits = logsearch.search(
                q,
                instance_ids=list(instances),
                stream=stream_param(request),
                since=time_param(request, "since"),
                until=time_param(request, "until"),
                limit=limit,
                order=order,
                before_id=bounded_int(before, 0, 2**62, "before") if before else None,
            )
        except logsearch.SearchError as e:
            raise ValidationError({"q": [str(e)]}) from None
        results = [
            {
                "id": hit.id,
                "instance": instances.get(hit.instance_id, ""),
                "stream": hit.stream,
                "time": hit.time.isoformat(),
                "text": hit.text,
                "snippet": hit.snippet,
            }
            for hit in hits
        ]
        paged = order == "newest" and len(results) == limit
        next_before = results[-1]["id"] if paged else None
        return Response({"results": results, "next_before": next_before})


class EventStreamRenderer(JSONRenderer):
    """Lets `Accept: text/event-stream` (what EventSource sends) through negotiation;
    errors before the stream starts are still JSON."""

    media_type = "text/event-stream"


class LogStreamView(APIView):
    """New log lines as Server-Sent Events (`data: {...}`), until the client goes."""

    renderer_classes = (JSONRenderer, EventStreamRenderer)

    @extend_schema(parameters=FILTERS, responses={(200, "text/event-stream"): LOG_EVENT})
    def get(self, request: Request) -> StreamingHttpResponse:
        keys = {i.pk: str(i.key) for i in scoped_instances(request)}
        ids = list(keys)
        after = _resume_point(request)
        response = StreamingHttpResponse(
            follow(ids, keys, stream_param(request), after), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response


def _resume_point(request: Request) -> int:
    # EventSource resends the last id it saw; otherwise start from now.
    last = request.headers.get("Last-Event-ID", "")
    if last.isascii() and last.isdigit() and len(last) <= 18:
        return int(last)
    return LogLine.objects.order_by("-id").values_list("id", flat=True).first() or 0


@sync_to_async
def _lines_after(ids: list[int], stream: str | None, after: int) -> list[LogLine]:
    qs = LogLine.objects.filter(instance_id__in=ids, id__gt=after)
    if stream:
        qs = qs.filter(stream=stream)
    return list(qs.order_by("id")[:STREAM_BATCH])


async def follow(
    ids: list[int], keys: dict[int, str], stream: str | None, after: int
) -> AsyncIterator[bytes]:
    quiet = 0.0
    while True:
        rows = await _lines_after(ids, stream, after) if ids else []
        for row in rows:
            after = row.id
            yield _event(row, keys)
        if rows:
            quiet = 0.0
            continue
        # The supervisor may be another process: there is no event to wait on here.
        await asyncio.sleep(POLL_SECONDS)
        quiet += POLL_SECONDS
        if quiet >= KEEPALIVE_SECONDS:
            quiet = 0.0
            # A comment line with no blank line after it: it keeps proxies from timing the
            # stream out and is folded into the next event, so it never dispatches as one.
            yield b": keepalive\n"


def _event(row: LogLine, keys: dict[int, str]) -> bytes:
    payload: dict[str, Any] = {
        "id": row.id,
        "instance": keys.get(row.instance_id, ""),
        "stream": row.stream,
        "time": row.time.isoformat(),
        "text": row.text,
    }
    return f"id: {row.id}\ndata: {json.dumps(payload)}\n\n".encode()
