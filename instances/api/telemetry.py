"""GET /api/telemetry: upstream's dashboard JSON (a summary and one row per instance).

Upstream serves it without a token; ours needs a read token (a list of every tenant is
not public). Request counts come from the Prometheus counters: per instance only with
TENEMENT_METRICS_PER_INSTANCE=1 (else null), per service always (`services`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from instances.api import serializers as s
from instances.api.auth import tenant_of
from instances.api.params import known_params
from instances.models import Instance

Totals = dict[tuple[str, ...], float]


def request_totals() -> tuple[Totals, Totals, Totals]:
    """(requests by service or (service, instance), duration sums and counts by service)."""
    from instances import metrics

    requests: Totals = defaultdict(float)
    seconds: Totals = defaultdict(float)
    counts: Totals = defaultdict(float)
    if not settings.TENEMENT_METRICS:
        return requests, seconds, counts
    for family in metrics.source_registry().collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "tenement_proxy_requests_total":
                who = (labels["service"], labels["instance"]) if "instance" in labels else None
                requests[(labels["service"],)] += sample.value
                if who:
                    requests[who] += sample.value
            elif sample.name == "tenement_proxy_request_duration_seconds_sum":
                seconds[(labels["service"],)] += sample.value
            elif sample.name == "tenement_proxy_request_duration_seconds_count":
                counts[(labels["service"],)] += sample.value
    return requests, seconds, counts


class TelemetryView(APIView):
    @extend_schema(responses=dict)
    def get(self, request: Request) -> Response:
        known_params(request, set())
        qs = Instance.objects.select_related("service").exclude(state=Instance.State.STOPPED)
        if tenant := tenant_of(request):
            qs = qs.filter(instance_id=tenant)
        totals = request_totals()
        context = {"now": time.time(), "request": request}
        rows = [telemetry_row(instance, totals, context) for instance in qs]
        requests = totals[0]
        summary = {
            "total_instances": len(rows),
            "healthy_instances": sum(1 for r in rows if r["health"] == "healthy"),
            "total_requests": int(sum(v for k, v in requests.items() if len(k) == 1)),
        }
        services = sorted({i.service.name for i in qs})
        by_service = {name: int(requests.get((name,), 0)) for name in services}
        return Response({"summary": summary, "instances": rows, "services": by_service})


def telemetry_row(
    instance: Instance, totals: tuple[Totals, Totals, Totals], context: dict[str, Any]
) -> dict[str, Any]:
    """Upstream's per-instance row: its fields, request counts and mean duration."""
    requests, seconds, counts = totals
    data = s.InstanceSerializer(instance, context=context).data
    service = instance.service.name
    count = counts.get((service,), 0)
    per_instance = settings.TENEMENT_METRICS_PER_INSTANCE
    mine = requests.get((service, instance.instance_id), 0)
    return {
        **{k: data[k] for k in UPSTREAM_ROW},
        "process": service,
        "instance": instance.instance_id,
        "requests_total": int(mine) if per_instance else None,
        # Per service: histograms are never per instance (their series cost).
        "request_duration_avg_ms": round(seconds.get((service,), 0) * 1000 / count, 3)
        if count
        else 0.0,
        "request_duration_p99_ms": None,
    }


UPSTREAM_ROW = (
    "id",
    "health",
    "uptime_secs",
    "idle_secs",
    "restarts",
    "weight",
    "storage_used_bytes",
    "storage_quota_bytes",
)
