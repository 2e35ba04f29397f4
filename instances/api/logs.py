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
from instances.api.params import bounded_int, int_param, known_params
from instances.ids import LABEL_RE, InvalidName, parse_key
from instances.models import Instance, LogLine

POLL_SECONDS = 0.5  # lines are written by the supervisor, maybe in another process
KEEPALIVE_SECONDS = 15.0
STREAM_BATCH = 500

# One log line, as search results and SSE events carry it: ours, then upstream's names
# for the same facts (its `ten logs` reads timestamp, level, process, instance_id, message).
LINE_FIELDS = {
    "id": serializers.IntegerField(),
    "instance": serializers.CharField(),
    "stream": serializers.CharField(),
    "time": serializers.DateTimeField(),
    "text": serializers.CharField(),
    "timestamp": serializers.IntegerField(help_text="Unix milliseconds (upstream's)"),
    "level": serializers.CharField(help_text="stdout or stderr (upstream's name for stream)"),
    "process": serializers.CharField(help_text="the service (upstream's name)"),
    "instance_id": serializers.CharField(help_text="the tenant id"),
    "message": serializers.CharField(help_text="the line (upstream's name for text)"),
}
LOG_EVENT = inline_serializer("LogEvent", fields=LINE_FIELDS)
LOG_HITS = inline_serializer(
    "LogHit", fields={**LINE_FIELDS, "snippet": serializers.CharField(allow_null=True)}, many=True
)
# Upstream's filters (its `ten logs` sends them): exact service and tenant, the stream.
UPSTREAM_FILTERS = [
    OpenApiParameter("process", str, description="service name (upstream's filter)"),
    OpenApiParameter("id", str, description="tenant id (upstream's filter)"),
    OpenApiParameter("level", str, enum=["stdout", "stderr"], description="upstream's stream"),
]
STREAM_PARAMS = frozenset({"instance", "stream", "process", "id", "level"})
SEARCH_PARAMS = STREAM_PARAMS | {"q", "since", "until", "limit", "order", "before", "search"}

KEY = f"{LABEL_RE.pattern}:{LABEL_RE.pattern}"
FILTERS = [
    OpenApiParameter(
        "instance", {"type": "string", "pattern": f"^{KEY}$"}, description="SERVICE:ID"
    ),
    OpenApiParameter("stream", str, enum=["stdout", "stderr"]),
]


def scoped_instances(request: Request) -> QuerySet[Instance]:
    """The instances this caller may read, narrowed to ?instance= (and upstream's
    ?process= and ?id=) if given."""
    qs = Instance.objects.select_related("service")
    if tenant := tenant_of(request):
        qs = qs.filter(instance_id=tenant)
    for param, field in (("process", "service__name"), ("id", "instance_id")):
        if raw := request.query_params.get(param):
            if not LABEL_RE.fullmatch(raw):
                raise ValidationError({param: ["must be a name of lowercase letters, digits, -"]})
            qs = qs.filter(**{field: raw})
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
    level = request.query_params.get("level") or None
    for name, value in (("stream", stream), ("level", level)):
        if value not in (None, "stdout", "stderr"):
            raise ValidationError({name: ["must be stdout or stderr"]})
    if stream and level and stream != level:
        raise ValidationError({"level": ["contradicts stream (level is upstream's name for it)"]})
    return stream or level


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
            *UPSTREAM_FILTERS,
            OpenApiParameter("q", str, description='words, "a phrase", -exclude'),
            OpenApiParameter("search", str, description="a substring (upstream's filter)"),
            OpenApiParameter("since", OpenApiTypes.DATETIME),
            OpenApiParameter("until", OpenApiTypes.DATETIME),
            int_param("limit", 1000, "default 100"),
            OpenApiParameter(
                "order", str, enum=["rank", "newest"], description="default: oldest first"
            ),
            int_param("before", 2**62, "the next page: X-Next-Before of the last one"),
        ],
        responses=LOG_HITS,
    )
    def get(self, request: Request) -> Response:
        """A JSON array of lines, as upstream's. Without `q` or `order` it holds the newest
        `limit` lines oldest first (upstream's order); `order=newest` lists newest first,
        `q` ranks. The next page's `before` is in the X-Next-Before header."""
        known_params(request, SEARCH_PARAMS)
        instances = {i.pk: str(i.key) for i in scoped_instances(request)}
        q = request.query_params.get("q") or None
        search = request.query_params.get("search")
        if search is not None and (q or request.query_params.get("order")):
            raise ValidationError({"search": ["a substring filter: not with q or order"]})
        requested = request.query_params.get("order")
        order = (requested or "rank") if q else "newest"
        if requested not in (None, "", "rank", "newest"):
            raise ValidationError({"order": ["must be rank or newest"]})
        if order == "rank" and request.query_params.get("before"):
            raise ValidationError({"before": ["paging needs order=newest"]})
        limit = bounded_int(request.query_params.get("limit"), 100, 1000, "limit")
        hits = self.hits(request, list(instances), q, search, order, limit)
        chronological = not q and not requested  # upstream's: the newest lines, oldest first
        if chronological:
            hits.reverse()
        results = [hit_json(hit, instances) for hit in hits]
        headers = {}
        if order == "newest" and len(results) == limit:
            headers["X-Next-Before"] = str(min(r["id"] for r in results))
        return Response(results, headers=headers)

    @staticmethod
    def hits(
        request: Request, ids: list[int], q: str | None, search: str | None, order: str, limit: int
    ) -> list[Any]:
        from instances import logsearch

        before = request.query_params.get("before")
        since, until = time_param(request, "since"), time_param(request, "until")
        stream = stream_param(request)
        before_id = bounded_int(before, 0, 2**62, "before") if before else None
        if search is not None:
            return substring_hits(ids, stream, search, since, until, limit, before_id)
        try:
            return logsearch.search(
                q,
                instance_ids=ids,
                stream=stream,
                since=since,
                until=until,
                limit=limit,
                order=order,
                before_id=before_id,
            )
        except logsearch.SearchError as e:
            raise ValidationError({"q": [str(e)]}) from None


def substring_hits(
    ids: list[int],
    stream: str | None,
    text: str,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    before_id: int | None,
) -> list[Any]:
    """Upstream's `search`: lines containing the text (newest first, then reversed)."""
    from instances import logsearch

    qs = LogLine.objects.filter(instance_id__in=ids, text__contains=text)
    if stream:
        qs = qs.filter(stream=stream)
    if since:
        qs = qs.filter(time__gte=since)
    if until:
        qs = qs.filter(time__lt=until)
    if before_id:
        qs = qs.filter(id__lt=before_id)
    rows = qs.order_by("-id")[:limit]
    return [logsearch.Hit(r.id, r.instance_id, r.stream, r.time, r.text, None) for r in rows]


def line_json(
    line_id: int, instance: str, stream: str, time: datetime, text: str
) -> dict[str, Any]:
    service, _, tenant = instance.partition(":")
    return {
        "id": line_id,
        "instance": instance,
        "stream": stream,
        "time": time.isoformat(),
        "text": text,
        "timestamp": int(time.timestamp() * 1000),
        "level": stream,
        "process": service,
        "instance_id": tenant,
        "message": text,
    }


def hit_json(hit: Any, instances: dict[int, str]) -> dict[str, Any]:
    line = line_json(hit.id, instances.get(hit.instance_id, ""), hit.stream, hit.time, hit.text)
    return {**line, "snippet": hit.snippet}


class EventStreamRenderer(JSONRenderer):
    """Lets `Accept: text/event-stream` (what EventSource sends) through negotiation;
    errors before the stream starts are still JSON."""

    media_type = "text/event-stream"


class LogStreamView(APIView):
    """New log lines as Server-Sent Events (`data: {...}`), until the client goes."""

    renderer_classes = (JSONRenderer, EventStreamRenderer)

    @extend_schema(
        parameters=[*FILTERS, *UPSTREAM_FILTERS],
        responses={(200, "text/event-stream"): LOG_EVENT},
    )
    def get(self, request: Request) -> StreamingHttpResponse:
        known_params(request, STREAM_PARAMS)
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
    payload = line_json(row.id, keys.get(row.instance_id, ""), row.stream, row.time, row.text)
    return f"id: {row.id}\ndata: {json.dumps(payload)}\n\n".encode()
