"""The API as a superset of upstream's, at the view level: shapes, filters, refusals."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from instances.models import LogLine
from tests import test_api
from tests.test_api import client

# test_api's fixtures: its world (notes:alice and notes:bob, a line each) and clean limits.
world = test_api.world
clean_rate_limits = test_api.clean_rate_limits

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]


@pytest.mark.parametrize(
    "url",
    [
        "/api/instances?sevrice=notes",
        "/api/services/?x=1",
        "/api/tokens/?x=1",
        "/api/logs?proces=notes",
        "/api/logs/stream?instanse=notes:alice",
        "/api/instances/notes:alice/events/?limt=3",
        "/api/telemetry?all=1",
    ],
)
def test_unknown_query_parameters_are_refused(world: dict, url: str) -> None:
    response = client("admin").get(url)
    assert response.status_code == 400, response.content
    body = response.json()["error"]
    assert "unknown query parameter" in str(body["fields"])


def test_upstream_fields_of_an_instance(world: dict) -> None:
    read = client("read")
    row = read.get("/api/instances", {"all": "true"}).json()[0]
    assert row["id"] == "notes:alice" and row["key"] == "notes:alice"
    for field in ("socket", "uptime_secs", "idle_secs", "restarts", "health", "weight"):
        assert field in row
    assert row["health"] == "unknown" and row["weight"] == 100
    assert isinstance(row["storage_used_bytes"], int) and row["storage_quota_bytes"] is None
    # Asleep (stopped): not in upstream's list, which shows instances with a process.
    assert read.get("/api/instances").json() == []
    assert len(read.get("/api/instances", {"state": "stopped"}).json()) == 2
    assert read.get("/api/instances", {"state": "asleep"}).status_code == 400


def test_logs_in_upstreams_shape_and_filters(world: dict) -> None:
    alice = world["alice"]
    now = timezone.now()
    for i, stream in enumerate(["stdout", "stderr", "stdout"]):
        LogLine.objects.create(
            instance=alice, stream=stream, time=now + timedelta(seconds=i + 1), text=f"later {i}"
        )
    read = client("read")
    lines = read.get("/api/logs", {"process": "notes", "id": "alice"}).json()
    assert [line["message"] for line in lines] == ["alice says hi", "later 0", "later 1", "later 2"]
    first = lines[0]
    assert first["process"] == "notes" and first["instance_id"] == "alice"
    assert first["level"] == first["stream"] == "stdout"
    assert first["timestamp"] == int(
        timezone.datetime.fromisoformat(first["time"]).timestamp() * 1000
    )
    assert [
        x["message"] for x in read.get("/api/logs", {"id": "alice", "level": "stderr"}).json()
    ] == ["later 1"]
    assert [x["message"] for x in read.get("/api/logs", {"search": "ater 2"}).json()] == ["later 2"]
    assert read.get("/api/logs", {"id": "bob"}).json()[0]["message"] == "bob says hi"
    # limit keeps the newest, still oldest first; the next page is in a header.
    page = read.get("/api/logs", {"id": "alice", "limit": 2})
    assert [x["message"] for x in page.json()] == ["later 1", "later 2"]
    newest = read.get("/api/logs", {"id": "alice", "limit": 2, "order": "newest"})
    assert [x["message"] for x in newest.json()] == ["later 2", "later 1"]
    older = read.get(
        "/api/logs",
        {"id": "alice", "limit": 2, "order": "newest", "before": newest["X-Next-Before"]},
    )
    assert [x["message"] for x in older.json()] == ["later 0", "alice says hi"]
    assert read.get("/api/logs", {"level": "debug"}).status_code == 400
    assert read.get("/api/logs", {"search": "x", "q": "x"}).status_code == 400


def test_a_tenant_token_cannot_widen_its_view_with_upstream_filters(world: dict) -> None:
    alice = client("read", tenant="alice")
    assert alice.get("/api/logs", {"id": "bob"}).json() == []
    assert alice.get("/api/logs", {"process": "notes"}).json()[0]["instance_id"] == "alice"


def test_health_storage_and_telemetry(world: dict) -> None:
    read = client("read")
    health = read.get("/api/instances/notes:alice/health").json()
    assert health == {
        "instance": "notes:alice",
        "health": "unknown",
        "state": "stopped",
        "health_ok": None,
        "health_checked_at": None,
    }
    storage = read.get("/api/instances/notes:alice/storage").json()
    assert storage["path"].endswith("/notes/alice") and storage["used_bytes"] == 0
    assert storage["quota_bytes"] is None and storage["usage_percent"] is None
    telemetry = read.get("/api/telemetry").json()
    assert telemetry["summary"] == {
        "total_instances": 0,  # nothing runs
        "healthy_instances": 0,
        "total_requests": 0,
    }
    assert client().get("/api/telemetry").status_code == 401
    world["alice"].state, world["alice"].health_ok = "running", True
    world["alice"].save()
    telemetry = read.get("/api/telemetry").json()
    assert telemetry["summary"]["total_instances"] == telemetry["summary"]["healthy_instances"] == 1
    (row,) = telemetry["instances"]
    assert row["id"] == "notes:alice" and row["process"] == "notes" and row["instance"] == "alice"
    assert row["health"] == "healthy" and row["weight"] == 100


def test_spawn_body_is_checked(world: dict) -> None:
    write = client("write")
    bad = write.post("/api/instances/spawn", {"process": "notes", "id": "wr_a"}, format="json")
    assert bad.status_code == 400 and "'_' cannot appear in a host name" in str(bad.json())
    unknown = write.post("/api/instances/spawn", {"process": "nope", "id": "a"}, format="json")
    assert unknown.status_code == 404
