"""The charts' in-memory last hour: pure tests with a fake clock, and the JSON views."""

from __future__ import annotations

import math

import pytest

from instances.timeline import SAMPLE_CAP, Timeline, p95_ms

pytestmark = [pytest.mark.timeout(30)]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_step_becomes_one_point_of_every_series() -> None:
    clock = Clock()
    line = Timeline(step=10, clock=clock)
    assert line.overview_data()["t"] == []  # nothing closed yet
    for ms in range(1, 101):  # 100 requests of 1..100 ms
        line.request("notes:alice", ms / 1000)
    line.wake("notes:alice", 0.120)
    clock.now += 10
    line.roll(running=3, rss={"notes:alice": 50 * 2**20})
    over = line.overview_data()
    assert over["t"] == [1_000_010.0] and over["step_s"] == 10
    assert over["req_per_s"] == [10.0] and over["wakes"] == [1] and over["running"] == [3]
    alice = line.instance_data("notes:alice")
    assert alice["requests"] == [100] and alice["p95_ms"] == [95.0]
    assert math.isclose(alice["wake_ms"][0], 120, rel_tol=1e-3)
    assert alice["rss_mb"] == [50.0]
    # A quiet step: zero requests while it runs, no latency or wake to show.
    clock.now += 10
    line.roll(running=3, rss={"notes:alice": 51 * 2**20})
    alice = line.instance_data("notes:alice")
    assert alice["requests"] == [100, 0] and alice["p95_ms"] == [95.0, None]
    assert alice["wake_ms"][1] is None and alice["rss_mb"] == [50.0, 51.0]
    assert line.instance_data("notes:nobody")["requests"] == [None, None]


def test_memory_is_bounded_to_the_window_and_forgotten_instances() -> None:
    clock = Clock()
    line = Timeline(step=60, clock=clock)  # 60 points an hour
    line.request("notes:once", 0.01)
    for _ in range(200):
        clock.now += 60
        line.roll(running=0, rss={})
        for _ in range(3 * SAMPLE_CAP // 200):
            line.request("notes:busy", 0.005)
    data = line.overview_data()
    assert len(data["t"]) == 60 and data["t"][-1] == clock.now
    assert "notes:once" not in line.instances  # an hour with nothing: dropped
    assert len(line.instances["notes:busy"].rings["requests"].values) == 60


def test_the_p95_sample_stays_bounded_under_a_flood() -> None:
    line = Timeline(step=10)
    for i in range(10 * SAMPLE_CAP):
        line.request("k", (i % 100) / 1000)
    pending = line.pending["k"]
    assert pending.requests == 10 * SAMPLE_CAP and len(pending.durations) == SAMPLE_CAP
    assert 85 <= p95_ms(pending.durations) <= 99  # a uniform sample of 0..99 ms


@pytest.mark.django_db
def test_the_chart_views_need_staff_and_answer_json() -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from instances import timeline
    from instances.ids import InstanceKey
    from instances.models import Instance, Service

    service = Service.objects.create(name="notes", command="x", data_dir="/tmp/x")
    Instance.objects.create(service=service, instance_id="alice")
    assert Client().get("/charts/overview.json").status_code == 302  # to the login page
    staff = Client()
    staff.force_login(User.objects.create_user("op", password="pw", is_staff=True))
    line = timeline.current()
    line.request(InstanceKey("notes", "alice"), 0.002)
    line.roll(running=1, rss={InstanceKey("notes", "alice"): 2**20})
    over = staff.get("/charts/overview.json").json()
    assert set(over) == {"step_s", "t", "req_per_s", "wakes", "running"}
    assert over["running"][-1] == 1
    alice = staff.get("/instances/notes:alice/charts.json").json()
    assert alice["requests"][-1] == 1 and alice["rss_mb"][-1] == 1.0
    assert staff.get("/instances/notes:zed/charts.json").status_code == 404
