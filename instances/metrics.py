"""Prometheus metrics: every tenement_* metric, the state collector, multiprocess mode.

Three kinds of figures, each counted exactly once however many processes there are:
- events (requests, wakes, restarts, log lines...) are counters and histograms that the
  process seeing the event increments; with PROMETHEUS_MULTIPROC_DIR set, prometheus_client
  keeps them in files there and /metrics sums every process's files;
- open connections are a live gauge per proxy process (multiprocess_mode "livesum": the
  sum over live processes; a process's share goes with it, see `mark_process_dead`);
- current state (instances by state, registered, uptime) is read from the database when
  /metrics is scraped, by the one process answering, so it is never stored or summed.

The upstream aliases (tenement_requests_total...) are derived from the collected originals
at scrape time, so they equal them by construction and cost nothing per request.

Hot paths get bound recorders that cache labelled children per instance key: a request
costs one dict lookup, one counter increment and one histogram observation.
"""

from __future__ import annotations

import atexit
import collections
import functools
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import prometheus_client
import psutil
from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from instances.ids import InstanceKey

# Wakes are the figure operators watch most: fine steps across 10-100 ms, then coarse.
WAKE_BUCKETS = (
    *(0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1),
    *(0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Index = status // 100; 0 is a client that went before any response (nginx's 499).
CODE_CLASSES = ("4xx", "1xx", "2xx", "3xx", "4xx", "5xx")
STATES = ("stopped", "starting", "running", "stopping", "backoff", "failed")

# _created series would double every counter's series count for a figure nobody graphs.
prometheus_client.disable_created_metrics()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metric objects of this process (one set, built on first use)."""

    def __init__(self, per_instance: bool) -> None:
        self.per_instance = per_instance
        who = ["service", "instance"] if per_instance else ["service"]
        self.requests = Counter(
            "tenement_proxy_requests_total",
            "Requests proxied to tenant instances, by response code class "
            "(4xx includes clients that left before any response).",
            [*who, "code"],
        )
        # Histograms stay per service even per instance: 16 series per tenant is too many.
        self.request_seconds = Histogram(
            "tenement_proxy_request_duration_seconds",
            "Time from a proxied request's arrival to the end of its response, wakes included.",
            ["service"],
            buckets=REQUEST_BUCKETS,
        )
        self.wakes = Counter(
            "tenement_wakes_total",
            "Wakes of sleeping instances by outcome; one per wake however many requests "
            "waited on it (rejected: one per request refused without being held).",
            [*who, "outcome"],
        )
        self.wake_seconds = Histogram(
            "tenement_wake_duration_seconds",
            "Time from the first held request to the instance being ready (successful wakes).",
            ["service"],
            buckets=WAKE_BUCKETS,
        )
        self.open = Gauge(
            "tenement_open_connections",
            "Open proxied connections: HTTP requests in flight and WebSockets.",
            [*who, "kind"],
            multiprocess_mode="livesum",
        )
        self.restarts = Counter(
            "tenement_restarts_total",
            "Restarts by reason: crash (an exit nobody asked for, or a failed start), "
            "health (failed health checks), manual (operator restart), oom (killed by the "
            "kernel at the service's memory_limit_mb).",
            [*who, "reason"],
        )
        self.health_failures = Counter(
            "tenement_health_check_failures_total", "Failed periodic health checks.", who
        )
        self.idle_stops = Counter(
            "tenement_idle_stops_total", "Instances stopped for idleness (scale to zero).", who
        )
        self.log_lines = Counter(
            "tenement_log_lines_total", "Lines captured from apps' output.", [*who, "stream"]
        )
        self.acme_orders = Counter(
            "tenement_acme_orders_total",
            "ACME certificate orders by outcome: issued, failed, or capped (not placed: "
            "over settings.tls.orders_per_hour).",
            ["outcome"],
        )
        self.release_requests = Counter(
            "tenement_release_requests_total",
            "HTTP requests proxied, by the release that served them (on a weighted service "
            "host, the instance id: upstream's versions) and response code class.",
            ["service", "release", "code"],
        )
        self.release_changes = Counter(
            "tenement_release_changes_total",
            "Changes to releases, weights and pins (each is also an audit record).",
            ["service", "kind"],
        )
        self.release_fallbacks = Counter(
            "tenement_release_fallbacks_total",
            "Starts on a release that failed and fell back to the tenant's last healthy one.",
            ["service", "release"],
        )

    def labels_of(self, key: InstanceKey) -> tuple[str, ...]:
        return tuple(key) if self.per_instance else (key.service,)


@functools.cache
def current() -> Metrics | None:
    """This process's metrics, or None when TENEMENT_METRICS is off."""
    if not settings.TENEMENT_METRICS:
        return None
    if path := multiprocess_dir():
        os.makedirs(path, mode=0o700, exist_ok=True)
        # Live gauges of a process that exited must stop counting; counters stay summed.
        atexit.register(mark_process_dead, os.getpid(), path)
    return Metrics(settings.TENEMENT_METRICS_PER_INSTANCE)


# ---- recorders for the hot paths -------------------------------------------------------


class RequestRecorder:
    """Counts proxied requests; children are bound once per instance key."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.bound: dict[InstanceKey, tuple[list[Any], Any]] = {}

    def observe(self, key: InstanceKey, status: int, seconds: float) -> None:
        bound = self.bound.get(key)
        if bound is None:
            bound = self.bound[key] = (
                [None] * len(CODE_CLASSES),
                self.metrics.request_seconds.labels(key.service),
            )
        codes, histogram = bound
        index = status // 100 if 100 <= status < 600 else 0
        child = codes[index]
        if child is None:  # bound on first use: only code classes that occur get a series
            labels = (*self.metrics.labels_of(key), CODE_CLASSES[index])
            child = codes[index] = self.metrics.requests.labels(*labels)
        child.inc()
        histogram.observe(seconds)


def request_recorder() -> Callable[[InstanceKey, int, float], None] | None:
    metrics = current()
    return RequestRecorder(metrics).observe if metrics is not None else None


def wake_finished(
    key: InstanceKey, outcome: str, seconds: float | None = None, count: int = 1
) -> None:
    """One wake's outcome (ok, timeout, failed, rejected); `seconds` for successful ones;
    `count` for rejections of several held requests at once."""
    if (metrics := current()) is None:
        return
    metrics.wakes.labels(*metrics.labels_of(key), outcome).inc(count)
    if seconds is not None:
        metrics.wake_seconds.labels(key.service).observe(seconds)


class OpenConnections:
    """Publishes a proxy's open-connection counts to the live gauge (off the hot path)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.shown: set[tuple[str, ...]] = set()

    def publish(self, total: Iterable[tuple[InstanceKey, int]], websockets: dict) -> None:
        counts: collections.Counter[tuple[str, ...]] = collections.Counter()
        for key, n in total:
            ws = websockets.get(key, 0)
            labels = self.metrics.labels_of(key)
            counts[(*labels, "http")] += n - ws
            counts[(*labels, "websocket")] += ws
        for labels in self.shown - counts.keys():
            self.metrics.open.labels(*labels).set(0)  # not removed: a series that vanishes
        for labels, n in counts.items():  # reads as "no data", not as zero
            self.metrics.open.labels(*labels).set(n)
        self.shown |= counts.keys()


def open_connections() -> OpenConnections | None:
    metrics = current()
    return OpenConnections(metrics) if metrics is not None else None


# ---- supervisor events (not per request; a label lookup each is fine) ---------------------


def restarted(key: InstanceKey, reason: str) -> None:
    if (metrics := current()) is not None:
        metrics.restarts.labels(*metrics.labels_of(key), reason).inc()


def health_check_failed(key: InstanceKey) -> None:
    if (metrics := current()) is not None:
        metrics.health_failures.labels(*metrics.labels_of(key)).inc()


def idle_stopped(key: InstanceKey) -> None:
    if (metrics := current()) is not None:
        metrics.idle_stops.labels(*metrics.labels_of(key)).inc()


def acme_order(outcome: str) -> None:
    if (metrics := current()) is not None:
        metrics.acme_orders.labels(outcome).inc()


def release_fallback(service: str, release: str) -> None:
    if (metrics := current()) is not None:
        metrics.release_fallbacks.labels(service, release).inc()


def release_changed(service: str, kind: str) -> None:
    if (metrics := current()) is not None:
        metrics.release_changes.labels(service, kind).inc()


class ReleaseRequests:
    """Counts requests per (service, release, code class); children bound on first use."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.bound: dict[tuple[str, str, int], Any] = {}

    def observe(self, service: str, release: str, status: int) -> None:
        index = status // 100 if 100 <= status < 600 else 0
        child = self.bound.get((service, release, index))
        if child is None:
            child = self.bound[(service, release, index)] = self.metrics.release_requests.labels(
                service, release, CODE_CLASSES[index]
            )
        child.inc()


def release_error_rates() -> dict[tuple[str, str], tuple[float, float]]:
    """(service, release) -> (requests, 5xx answers) so far, for the dashboard."""
    out: dict[tuple[str, str], tuple[float, float]] = {}
    if current() is None:
        return out
    for family in source_registry().collect():
        if family.name != "tenement_release_requests":
            continue
        for s in family.samples:
            if not s.name.endswith("_total"):
                continue
            key = (s.labels["service"], s.labels["release"])
            total, errors = out.get(key, (0.0, 0.0))
            out[key] = (total + s.value, errors + (s.value if s.labels["code"] == "5xx" else 0))
    return out


def release_request_recorder() -> Callable[[str, str, int], None] | None:
    metrics = current()
    return ReleaseRequests(metrics).observe if metrics is not None else None


def _nothing() -> None:
    pass


def log_line_counter(key: InstanceKey, stream: str) -> Callable[[], None]:
    """The increment for one app's pipe, bound once per pipe rather than per line."""
    if (metrics := current()) is None:
        return _nothing
    return metrics.log_lines.labels(*metrics.labels_of(key), stream).inc


# ---- scrape time --------------------------------------------------------------------------


class StateCollector:
    """Instances by state, registered and uptime, read from the database per scrape."""

    def __init__(self, per_instance: bool) -> None:
        self.per_instance = per_instance

    def families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        who = ["service", "instance"] if self.per_instance else ["service"]
        return (
            GaugeMetricFamily(
                "tenement_instances",
                "Registered instances by current state.",
                labels=["service", "state"],
            ),
            GaugeMetricFamily(
                "tenement_instances_registered", "Registered instances.", labels=["service"]
            ),
            GaugeMetricFamily(
                "tenement_instance_uptime_seconds",
                "Seconds since the longest-running running instance of the service started "
                "(0 when none runs); per instance with TENEMENT_METRICS_PER_INSTANCE.",
                labels=who,
            ),
        )

    def collect(self) -> Iterator[Metric]:
        from django.db.models import Count

        from instances.models import Instance

        by_state, registered, uptime = self.families()
        # Counted by the database: one row per (service, state), not one per instance.
        grouped = Instance.objects.order_by().values_list("service__name", "state")
        counts = {(service, state): n for service, state, n in grouped.annotate(n=Count("pk"))}
        rows_running = Instance.objects.filter(state="running", started_at__isnull=False)
        started = rows_running.values_list("service__name", "instance_id", "started_at")
        services = sorted({service for service, _ in counts})
        for service in services:
            registered.add_metric([service], sum(counts.get((service, s), 0) for s in STATES))
            for state in STATES:
                by_state.add_metric([service, state], counts.get((service, state), 0))
        self.add_uptime(uptime, services, list(started))
        return iter((by_state, registered, uptime))

    def add_uptime(self, family: GaugeMetricFamily, services: list[str], started: list) -> None:
        now = time.time()
        if self.per_instance:
            for service, instance_id, at in started:
                family.add_metric([service, instance_id], max(0.0, now - at.timestamp()))
            return
        longest = dict.fromkeys(services, 0.0)
        for service, _, at in started:
            longest[service] = max(longest.get(service, 0.0), now - at.timestamp())
        for service, seconds in longest.items():
            family.add_metric([service], seconds)


def tls_families() -> list[Metric]:
    """Each served certificate's expiry (this process's HTTPS listener, if it has one)."""
    from proxy.tls.manager import current as tls_manager

    if (manager := tls_manager()) is None:
        return []
    family = GaugeMetricFamily(
        "tenement_tls_certificate_expiry_seconds",
        "When each served certificate expires (Unix time; subtract time() for what is left).",
        labels=["name", "source"],
    )
    for names, served in dict(manager.served).items():
        family.add_metric([",".join(names), served.source], served.cert.not_after.timestamp())
    return [family]


ALIASES_HELP = "Upstream tenement's name for "


def aliases(families: list[Metric], per_instance: bool) -> list[Metric]:
    """Upstream tenement's metric names, derived from ours (upstream calls a service a
    "process"): tenement_requests_total, tenement_instance_restarts_total,
    tenement_hibernation_wakes_total, tenement_instances_up, tenement_instances_running."""
    samples = {f.name: f.samples for f in families}
    who = ["process", "instance"] if per_instance else ["process"]
    ours = ["service", "instance"][: len(who)]

    def summed(source: str, sample_name: str, keep: Callable[[dict], bool]) -> dict:
        totals: dict[tuple[str, ...], float] = collections.defaultdict(float)
        for s in samples.get(source, ()):
            if s.name == sample_name and keep(s.labels):
                totals[tuple(s.labels.get(n, "") for n in ours)] += s.value
        return totals

    out: list[Metric] = []
    for name, source, keep in (
        ("tenement_requests", "tenement_proxy_requests", lambda _: True),
        ("tenement_instance_restarts", "tenement_restarts", lambda _: True),
        ("tenement_hibernation_wakes", "tenement_wakes", lambda s: s["outcome"] != "rejected"),
    ):
        family = CounterMetricFamily(name, f"{ALIASES_HELP}{source}_total.", labels=who)
        for labels, value in sorted(summed(source, f"{source}_total", keep).items()):
            family.add_metric(list(labels), value)
        out.append(family)
    running = sum(summed("tenement_instances", "tenement_instances", _is_running).values())
    for name in ("tenement_instances_up", "tenement_instances_running"):
        out.append(
            GaugeMetricFamily(name, f"{ALIASES_HELP}sum(tenement_instances{{state=running}}).")
        )
        out[-1].add_metric([], running)
    return out


def _is_running(labels: dict[str, str]) -> bool:
    return labels.get("state") == "running"


class _Collected:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


LIVE_GAUGE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db")


def sweep_dead_processes(path: str) -> None:
    """Drop the live gauges of processes that died without running atexit: SIGKILL, or
    uvicorn, which re-raises SIGTERM after its graceful shutdown."""
    pids = {int(m.group(1)) for f in os.listdir(path) if (m := LIVE_GAUGE_FILE.fullmatch(f))}
    for pid in pids:
        if not psutil.pid_exists(pid):
            mark_process_dead(pid, path)


def source_registry() -> CollectorRegistry:
    """Every process's counters in multiprocess mode, else this process's registry."""
    if path := multiprocess_dir():
        sweep_dead_processes(path)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path)
        return registry
    return REGISTRY


def exposition() -> bytes:
    """The text of /metrics: Django's and our metrics, the state, and the aliases."""
    per_instance = settings.TENEMENT_METRICS_PER_INSTANCE
    families = list(source_registry().collect())
    families += StateCollector(per_instance).collect()
    families += tls_families()
    families += aliases(families, per_instance)
    # generate_latest only calls .collect(): no registry needed around the list.
    return prometheus_client.generate_latest(_Collected(families))
