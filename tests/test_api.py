"""The REST API in-process: every endpoint with and without a token, scopes, tenants."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from instances import tokens
from instances.models import ApiToken, Event, Instance, LogLine, Service
from tests.conftest import TENANT_PYTHON, TESTAPP

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def clean_rate_limits() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def world(tmp_path: Path, settings: Any) -> dict[str, Instance]:
    settings.TENEMENT_DATA_DIR = tmp_path
    service = Service.objects.create(
        name="notes",
        command=f"{TENANT_PYTHON} {TESTAPP}",
        data_dir=str(tmp_path),
        env={"SECRET": "hunter2"},
    )
    rows = {}
    for tenant in ("alice", "bob"):
        rows[tenant] = Instance.objects.create(service=service, instance_id=tenant)
        Event.objects.create(instance=rows[tenant], kind="starting", message=f"{tenant} event")
        LogLine.objects.create(
            instance=rows[tenant], stream="stdout", time=timezone.now(), text=f"{tenant} says hi"
        )
    return rows


def client(scope: str | None = None, tenant: str = "", **kwargs: Any) -> APIClient:
    api = APIClient()
    if scope is not None:
        minted = tokens.mint(f"t-{scope}-{tenant or 'all'}", scope, tenant, **kwargs)
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {minted.secret}")
    return api


ENDPOINTS = [
    ("get", "/api/services/"),
    ("get", "/api/services/notes/"),
    ("post", "/api/services/"),
    ("patch", "/api/services/notes/"),
    ("get", "/api/instances/"),
    ("post", "/api/instances/"),
    ("get", "/api/instances/notes:alice/"),
    ("post", "/api/instances/notes:alice/start/"),
    ("post", "/api/instances/notes:alice/stop/"),
    ("post", "/api/instances/notes:alice/restart/"),
    ("delete", "/api/instances/notes:alice/"),
    ("get", "/api/instances/notes:alice/events/"),
    ("get", "/api/logs"),
    ("get", "/api/logs/stream"),
    ("get", "/api/tokens/"),
    ("post", "/api/tokens/"),
    ("delete", "/api/tokens/nobody/"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_every_endpoint_needs_a_token(world: dict, method: str, url: str) -> None:
    response = getattr(APIClient(), method)(url, {}, format="json")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"]["status"] == 401


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_every_endpoint_refuses_a_wrong_token(world: dict, method: str, url: str) -> None:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION="Bearer ten_000000000000_not-a-real-token")
    response = getattr(api, method)(url, {}, format="json")
    assert response.status_code == 401
    assert "invalid, expired or revoked" in response.json()["error"]["message"]


def test_expired_and_revoked_tokens_are_refused(world: dict) -> None:
    expired = client("admin", expires_days=1)
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    assert expired.get("/api/instances/").status_code == 401
    revoked = tokens.mint("soon-revoked", "admin")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {revoked.secret}")
    assert api.get("/api/instances/").status_code == 200
    tokens.revoke("soon-revoked")
    assert api.get("/api/instances/").status_code == 401


def test_failed_attempts_are_rate_limited_per_address(world: dict) -> None:
    bad = APIClient(REMOTE_ADDR="10.1.1.1")
    bad.credentials(HTTP_AUTHORIZATION="Bearer ten_000000000000_guess")
    codes = [bad.get("/api/instances/").status_code for _ in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    limited = bad.get("/api/instances/")
    assert int(limited["Retry-After"]) > 0
    # While limited, even a right token from that address waits: guessing gains nothing.
    good = tokens.mint("good", "read").secret
    bad.credentials(HTTP_AUTHORIZATION=f"Bearer {good}")
    assert bad.get("/api/instances/").status_code == 429
    other = APIClient(REMOTE_ADDR="10.1.1.2")
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {good}")
    assert other.get("/api/instances/").status_code == 200


def test_the_database_never_holds_a_token_in_plaintext(world: dict) -> None:
    minted = tokens.mint("stored", "admin")
    # ten_ + 12-hex prefix + _ : the rest is the random part (which may itself hold "_").
    secret_part = minted.secret[len("ten_") + 13 :]
    assert len(secret_part) >= 43
    with connection.cursor() as cursor:
        tables = connection.introspection.table_names(cursor)
        for table in tables:
            cursor.execute(f'SELECT * FROM "{table}"')
            for row in cursor.fetchall():
                assert not any(secret_part in str(value) for value in row), table
    token = ApiToken.objects.get(name="stored")
    assert token.digest == tokens.digest(minted.secret) and len(token.digest) == 64


def test_scopes(world: dict) -> None:
    read, write, admin = client("read"), client("write"), client("admin")
    assert read.get("/api/instances/").status_code == 200
    assert read.post("/api/instances/notes:alice/stop/").status_code == 403
    assert write.post("/api/instances/notes:alice/stop/").status_code == 202
    assert write.get("/api/tokens/").status_code == 403
    assert (
        write.post("/api/services/", {"name": "x", "command": "true"}, format="json").status_code
        == 403
    )
    assert admin.get("/api/tokens/").status_code == 200
    created = admin.post("/api/services/", {"name": "x", "command": "true"}, format="json")
    assert created.status_code == 201, created.json()


def test_a_tenant_token_sees_and_touches_only_its_own_instances(world: dict) -> None:
    alice = client("write", tenant="alice")
    listed = alice.get("/api/instances/", {"all": "true"}).json()
    assert [i["key"] for i in listed] == ["notes:alice"]
    for url in ("/api/instances/notes:bob/", "/api/instances/notes:bob/events/"):
        assert alice.get(url).status_code == 404
    for action in ("start", "stop", "restart"):
        assert alice.post(f"/api/instances/notes:bob/{action}/").status_code == 404
    assert alice.delete("/api/instances/notes:bob/").status_code == 404
    assert alice.post("/api/instances/notes:bob/deregister/").status_code == 404
    assert alice.get("/api/instances/notes:bob/health").status_code == 404
    spawn = alice.post("/api/instances/spawn", {"process": "notes", "id": "bob"}, format="json")
    assert spawn.status_code == 403
    assert alice.get("/api/logs", {"instance": "notes:bob"}).status_code == 404
    assert alice.get("/api/logs/stream", {"instance": "notes:bob"}).status_code == 404
    lines = alice.get("/api/logs").json()
    assert [line["text"] for line in lines] == ["alice says hi"]
    registering_bob = {"service": "notes", "instance_id": "carol"}
    assert alice.post("/api/instances/", registering_bob, format="json").status_code == 403
    assert Instance.objects.get(instance_id="bob").desired_state == "stopped"
    assert alice.post("/api/instances/notes:alice/start/").status_code == 202


@pytest.mark.django_db(transaction=True)
async def test_the_log_stream_is_tenant_restricted(world: dict, async_client: Any) -> None:
    minted = await asyncio.to_thread(tokens.mint, "sse-alice", "read", "alice")
    response = await async_client.get(
        "/api/logs/stream", headers={"Authorization": f"Bearer {minted.secret}"}
    )
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    stream = aiter(response.streaming_content)
    await asyncio.to_thread(_add_lines, world)
    first = await asyncio.wait_for(anext(stream), 10)
    assert b"alice new line" in first and b"bob" not in first
    second = await asyncio.wait_for(anext(stream), 10)
    assert b"alice second" in second  # bob's line in between was never sent


def _add_lines(world: dict) -> None:
    for tenant, text in (
        ("alice", "alice new line"),
        ("bob", "bob new"),
        ("alice", "alice second"),
    ):
        LogLine.objects.create(
            instance=world[tenant], stream="stdout", time=timezone.now(), text=text
        )


def test_services_create_validate_update_and_hide_env(world: dict) -> None:
    admin, read = client("admin"), client("read")
    bad = admin.post("/api/services/", {"name": "web", "comand": "x"}, format="json")
    assert bad.status_code == 400
    fields = bad.json()["error"]["fields"]
    assert "did you mean 'command'" in fields["comand"][0]
    assert (
        admin.post(
            "/api/services/", {"name": "Web/..", "command": "true"}, format="json"
        ).status_code
        == 400
    )
    assert (
        admin.post(
            "/api/services/", {"name": "notes", "command": "true"}, format="json"
        ).status_code
        == 409
    )
    patched = admin.patch("/api/services/notes/", {"idle_timeout": 42}, format="json")
    assert patched.status_code == 200 and patched.json()["idle_timeout"] == 42
    assert Service.objects.get(name="notes").command.endswith("testapp.py")  # kept
    assert admin.get("/api/services/notes/").json()["env"] == {"SECRET": "hunter2"}
    assert read.get("/api/services/notes/").json()["env"] == {"SECRET": "***"}


def test_instances_register_act_and_deregister(world: dict, tmp_path: Path) -> None:
    admin = client("admin")
    created = admin.post(
        "/api/instances/",
        {"service": "notes", "instance_id": "carol", "start": False},
        format="json",
    )
    assert created.status_code == 201 and created.json()["desired_state"] == "stopped"
    again = admin.post(
        "/api/instances/", {"service": "notes", "instance_id": "carol"}, format="json"
    )
    assert again.status_code == 409
    for body in (
        {"service": "notes", "instance_id": "Bad/.."},
        {"service": "notes", "instance_id": ".."},
    ):
        response = admin.post("/api/instances/", body, format="json")
        assert response.status_code == 400 and "instance_id" in response.json()["error"]["fields"]
    unknown = admin.post("/api/instances/", {"service": "nope", "instance_id": "x"}, format="json")
    assert unknown.status_code == 404
    assert admin.post("/api/instances/notes:carol/start/").json()["desired_state"] == "running"
    assert admin.post("/api/instances/notes:carol/stop/").json()["desired_state"] == "stopped"
    events = admin.get("/api/instances/notes:alice/events/").json()
    assert events[0]["message"] == "alice event"
    data_dir = tmp_path / "notes" / "carol"
    data_dir.mkdir(parents=True)
    # DELETE is upstream's stop: the tenant stays registered.
    admin.post("/api/instances/notes:carol/start/")
    assert admin.delete("/api/instances/notes:carol").status_code == 204
    assert Instance.objects.get(instance_id="carol").desired_state == "stopped"
    assert admin.post("/api/instances/notes:carol/deregister/").status_code == 204
    assert data_dir.exists()  # kept without ?purge
    assert not Instance.objects.filter(instance_id="carol").exists()
    bob_dir = tmp_path / "notes" / "bob"
    bob_dir.mkdir(parents=True)
    assert admin.post("/api/instances/notes:bob/deregister?purge=true").status_code == 204
    assert not bob_dir.exists()
    assert admin.get("/api/instances/notes:bob/").status_code == 404


def test_tokens_are_shown_once_listed_without_secrets_and_revocable(world: dict) -> None:
    admin = client("admin")
    created = admin.post("/api/tokens/", {"name": "ci", "scope": "write"}, format="json")
    assert created.status_code == 201
    secret = created.json()["token"]
    assert secret.startswith("ten_") and len(secret) > 40
    listed = admin.get("/api/tokens/").json()
    assert "token" not in str(listed).replace("'token'", "") or secret not in str(listed)
    assert secret not in str(listed)
    assert admin.post("/api/tokens/", {"name": "ci"}, format="json").status_code == 409
    assert (
        admin.post("/api/tokens/", {"name": "x", "scope": "root"}, format="json").status_code == 400
    )
    ci = APIClient()
    ci.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert ci.post("/api/instances/notes:alice/stop/").status_code == 202
    assert admin.delete("/api/tokens/ci/").status_code == 204
    assert ci.get("/api/instances/").status_code == 401
    assert admin.delete("/api/tokens/ci/").status_code == 404


def test_schema_and_docs(world: dict) -> None:
    schema = APIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    doc = schema.json()
    assert doc["openapi"].startswith("3.")
    assert "/api/instances/{key}/stop/" in doc["paths"]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert APIClient().get("/api/docs/").status_code == 200


def test_errors_are_json_never_tracebacks(world: dict) -> None:
    admin = client("admin")
    for response in (
        admin.get("/api/instances/notes:zed/"),
        admin.get("/api/instances/notes:alice/events/", {"limit": "lots"}),
        admin.get("/api/logs", {"since": "yesterday"}),
        admin.post("/api/instances/", "not json", content_type="application/json"),
    ):
        body = response.json()
        assert 400 <= response.status_code < 500
        assert set(body) == {"error"} and body["error"]["message"]
        assert "Traceback" not in response.content.decode()


def test_the_log_stream_accepts_what_eventsource_sends(world: dict) -> None:
    response = client("read").get("/api/logs/stream", HTTP_ACCEPT="text/event-stream")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    response.close()


def test_unknown_api_paths_are_json_404s(world: dict) -> None:
    admin = client("admin")
    for method in ("get", "post", "delete"):
        response = getattr(admin, method)("/api/instances/%C2%84/start/")
        assert response.status_code == 404
        assert response.json()["error"]["status"] == 404


def test_a_tenant_token_can_never_be_admin(world: dict) -> None:
    with pytest.raises(tokens.TokenError, match="cannot have admin scope"):
        tokens.mint("alice-admin", "admin", "alice")
    response = client("admin").post(
        "/api/tokens/", {"name": "x", "scope": "admin", "tenant": "alice"}, format="json"
    )
    assert response.status_code == 400
    # Even a row made behind mint()'s back gets no admin powers.
    sneaky = tokens.mint("sneaky", "admin")
    ApiToken.objects.filter(name="sneaky").update(tenant="alice")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {sneaky.secret}")
    assert api.get("/api/tokens/").status_code == 403
    assert (
        api.post("/api/tokens/", {"name": "y", "scope": "admin"}, format="json").status_code == 403
    )
    assert (
        api.post("/api/services/", {"name": "z", "command": "true"}, format="json").status_code
        == 403
    )


def test_token_names_with_a_slash_are_refused(world: dict) -> None:
    response = client("admin").post("/api/tokens/", {"name": "a/b"}, format="json")
    assert response.status_code == 400 and "'/'" in str(response.json())


# Transactional: the log stream closes its database connection when it ends, which a
# test wrapped in one transaction cannot survive on a file database (see conftest).
@pytest.mark.django_db(transaction=True)
def test_out_of_range_times_and_event_ids_are_400_or_ignored(world: dict) -> None:
    read = client("read")
    response = read.get("/api/logs", {"since": "0001-01-01T00:00:00+01:00"})
    assert response.status_code == 400 and "out of range" in str(response.json())
    for last in ("²", "9" * 30):
        stream = read.get("/api/logs/stream", HTTP_LAST_EVENT_ID=last)
        assert stream.status_code == 200  # a nonsense id means "from now"
        stream.close()
