"""The last hour of what the proxy and the supervisor already count, kept in memory for
the dashboard's charts: no extra service, no database writes.

The proxy adds each request (and its duration) and each wake to the current step's
counters (bounded: a sample of at most SAMPLE_CAP durations per instance, the longest
wake); every `step` seconds the supervisor closes the step (`roll`), adding how many
instances run and each one's RSS. Each series is a fixed ring of float32 values (NaN for
"no data"), so memory is bounded: about 6 KiB per instance that had anything to show in
the last hour, forgotten an hour after its last point. Only the process that serves the
proxy and runs the supervisor (the embedded `runsupervisor`) has the data.
"""

from __future__ import annotations

import math
import random
import time
from array import array
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

WINDOW_S = 3600
# Durations kept per instance and step for the p95 (a uniform sample beyond this).
SAMPLE_CAP = 1000


class Ring:
    """`size` float32 slots, one per step; the newest step is written at `head`."""

    __slots__ = ("values",)

    def __init__(self, size: int) -> None:
        self.values = array("f", [math.nan]) * size

    def put(self, index: int, value: float | None) -> None:
        self.values[index] = math.nan if value is None else value

    def ordered(self, head: int) -> list[float | None]:
        """Oldest first, with None where there is no data (JSON has no NaN)."""
        size = len(self.values)
        out = []
        for i in range(head + 1, head + 1 + size):
            value = self.values[i % size]
            out.append(None if math.isnan(value) else round(value, 3))
        return out


@dataclass
class Pending:
    """One instance's counters for the step under way."""

    requests: int = 0
    seen: int = 0  # durations offered to the sample
    durations: list[float] = field(default_factory=list)
    longest_wake: float | None = None  # seconds; only the longest is drawn

    def add(self, seconds: float) -> None:
        self.requests += 1
        self.seen += 1
        if len(self.durations) < SAMPLE_CAP:
            self.durations.append(seconds)
        elif (i := random.randrange(self.seen)) < SAMPLE_CAP:  # reservoir sampling
            self.durations[i] = seconds


SERIES = ("requests", "p95_ms", "wake_ms", "rss_mb")
OVERVIEW = ("req_per_s", "wakes", "running")


@dataclass
class History:
    rings: dict[str, Ring]
    last_data: int  # the step that last had a value


class Timeline:
    def __init__(self, step: int, clock: Callable[[], float] = time.time) -> None:
        self.step = step
        self.size = max(WINDOW_S // step, 2)
        self.clock = clock
        self.head = self.size - 1  # slot of the newest closed step
        self.closed = 0  # how many steps were closed
        self.ends: array[float] = array("d", [math.nan]) * self.size  # each slot's end time
        self.overview = {name: Ring(self.size) for name in OVERVIEW}
        self.instances: dict[Hashable, History] = {}
        self.pending: dict[Hashable, Pending] = {}
        self.pending_wakes = 0

    # ---- the proxy's side (per request: a dict lookup and an append) -----------------

    def request(self, key: Hashable, seconds: float) -> None:
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = Pending()
        pending.add(seconds)

    def wake(self, key: Hashable, seconds: float) -> None:
        pending = self.pending.get(key)
        if pending is None:
            pending = self.pending[key] = Pending()
        pending.longest_wake = max(pending.longest_wake or 0.0, seconds)
        self.pending_wakes += 1

    # ---- the supervisor's side (once a step) -----------------------------------------

    def roll(self, running: int, rss: dict[Hashable, int]) -> None:
        """Close the step under way: its counters become one point of every series."""
        pending, self.pending = self.pending, {}
        wakes, self.pending_wakes = self.pending_wakes, 0
        self.head = (self.head + 1) % self.size
        self.closed += 1
        self.ends[self.head] = self.clock()
        total = sum(p.requests for p in pending.values())
        self.overview["req_per_s"].put(self.head, total / self.step)
        self.overview["wakes"].put(self.head, wakes)
        self.overview["running"].put(self.head, running)
        for key in set(pending) | set(rss) | set(self.instances):
            self.close_instance(key, pending.get(key), rss.get(key))

    def close_instance(self, key: Hashable, pending: Pending | None, rss: int | None) -> None:
        history = self.instances.get(key)
        if pending is None and rss is None:
            if history is not None:
                for ring in history.rings.values():
                    ring.put(self.head, None)
                if self.closed - history.last_data >= self.size:
                    del self.instances[key]  # nothing left to show in the window
            return
        if history is None:
            history = self.instances[key] = History({s: Ring(self.size) for s in SERIES}, 0)
        history.last_data = self.closed
        rings = history.rings
        rings["requests"].put(self.head, pending.requests if pending else 0)
        rings["p95_ms"].put(self.head, p95_ms(pending.durations) if pending else None)
        wake = pending.longest_wake if pending else None
        rings["wake_ms"].put(self.head, wake * 1000 if wake is not None else None)
        rings["rss_mb"].put(self.head, rss / 2**20 if rss is not None else None)

    # ---- the dashboard's side ----------------------------------------------------------

    def times(self) -> list[float | None]:
        """Each step's end (Unix time; float64: float32 cannot hold seconds), oldest first."""
        out = []
        for i in range(self.head + 1, self.head + 1 + self.size):
            value = self.ends[i % self.size]
            out.append(None if math.isnan(value) else round(value, 3))
        return out

    def overview_data(self) -> dict[str, Any]:
        return self.columns(self.overview)

    def instance_data(self, key: Hashable) -> dict[str, Any]:
        history = self.instances.get(key)
        rings = history.rings if history else {s: Ring(self.size) for s in SERIES}
        return self.columns(rings)

    def columns(self, rings: dict[str, Ring]) -> dict[str, Any]:
        """uPlot's columnar form, only the steps closed so far: {"t": [...], name: [...]}."""
        times = self.times()
        first = next((i for i, t in enumerate(times) if t is not None), len(times))
        data: dict[str, Any] = {"step_s": self.step, "t": times[first:]}
        for name, ring in rings.items():
            data[name] = ring.ordered(self.head)[first:]
        return data


def p95_ms(durations: list[float]) -> float | None:
    if not durations:
        return None
    ordered = sorted(durations)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] * 1000


_timeline: Timeline | None = None


def current() -> Timeline:
    """This process's timeline (made on first use, with the configured step)."""
    global _timeline
    if _timeline is None:
        from django.conf import settings

        _timeline = Timeline(settings.TENEMENT_CHARTS_STEP_SECONDS)
    return _timeline
