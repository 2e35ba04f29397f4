"""Custom domains: the naming rules (pure) and /api/domains in-process."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from rest_framework.test import APIClient

from instances import tokens
from instances.ids import InstanceKey
from instances.models import Instance, Service
from routing import table
from routing.domains import DomainError, check_name
from routing.models import ROUTED, Domain
from tests.conftest import TENANT_PYTHON, TESTAPP
from tests.tls.pebble import Pebble

ALICE = InstanceKey("notes", "alice")
_names = itertools.count()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("notes.alice-corp.com", "notes.alice-corp.com"),
        ("Notes.Alice-Corp.COM.", "notes.alice-corp.com"),
        ("www.alice.notes.example.com", "www.alice.notes.example.com"),  # beneath its own host
    ],
)
def test_names_accepted(raw: str, expected: str) -> None:
    assert check_name(raw, ALICE, "example.com") == expected


@pytest.mark.parametrize(
    "raw, why",
    [
        ("bad_name.com", "not a DNS name"),
        ("a..b.com", "not a DNS name"),
        ("notes.alice-corp.com:8443", "without a port"),
        ("localhost", "with a dot"),
        ("10.0.0.1", "not an address"),
        ("example.com", "under this server's domain"),
        ("bob.notes.example.com", "under this server's domain"),
        ("x.bob.notes.example.com", "under this server's domain"),
        ("evil.example.com", "under this server's domain"),
    ],
)
def test_names_refused(raw: str, why: str) -> None:
    with pytest.raises(DomainError, match=why):
        check_name(raw, ALICE, "example.com")


def test_routing_table_maps_domains() -> None:
    built = table.build(
        [("notes", "alice", 30.0, 30.0, "running", "/s")],
        ["notes"],
        [("notes.alice-corp.com", "notes", "alice"), ("gone.example.org", "notes", "zed")],
    )
    assert built.domain_target("notes.alice-corp.com").key == ALICE
    assert built.domain_target("gone.example.org") is None  # no such instance
    assert built.domain_target("other.example.org") is None


@pytest.fixture
def world(tmp_path: Path, settings: Any) -> Iterator[dict[str, Instance]]:
    cache.clear()
    settings.TENEMENT_DATA_DIR = tmp_path
    settings.TENEMENT_DOMAIN = "example.com"
    service = Service.objects.create(
        name="notes", command=f"{TENANT_PYTHON} {TESTAPP}", data_dir=str(tmp_path)
    )
    yield {t: Instance.objects.create(service=service, instance_id=t) for t in ("alice", "bob")}
    cache.clear()


def client(scope: str, tenant: str = "") -> APIClient:
    api = APIClient()
    minted = tokens.mint(f"t-{next(_names)}", scope, tenant)
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {minted.secret}")
    return api


@pytest.mark.django_db
def test_api_add_list_remove(world: dict[str, Instance]) -> None:
    api = client("write")
    created = api.post(
        "/api/domains/", {"name": "Notes.Alice-Corp.com", "instance": "notes:alice"}, format="json"
    )
    assert created.status_code == 201, created.content
    assert created.json()["name"] == "notes.alice-corp.com"
    assert created.json()["instance"] == "notes:alice"

    # Unique: bob cannot take it; nothing stored changes.
    taken = api.post(
        "/api/domains/", {"name": "notes.alice-corp.com", "instance": "notes:bob"}, format="json"
    )
    assert taken.status_code == 409
    assert "notes:alice" in taken.json()["error"]["message"]

    bad = api.post(
        "/api/domains/", {"name": "bob.notes.example.com", "instance": "notes:alice"}, format="json"
    )
    assert bad.status_code == 400
    assert "under this server's domain" in bad.json()["error"]["fields"]["name"][0]
    nobody = api.post(
        "/api/domains/", {"name": "x.example.org", "instance": "notes:zed"}, format="json"
    )
    assert nobody.status_code == 400
    assert "not registered" in nobody.json()["error"]["fields"]["instance"][0]

    listed = client("read").get("/api/domains/")
    assert [d["name"] for d in listed.json()] == ["notes.alice-corp.com"]
    assert client("read").get("/api/domains/notes.alice-corp.com/").status_code == 200

    assert api.delete("/api/domains/notes.alice-corp.com/").status_code == 204
    assert Domain.objects.count() == 0
    assert api.delete("/api/domains/notes.alice-corp.com/").status_code == 404


@pytest.mark.django_db
def test_api_tenant_tokens_only_their_own(world: dict[str, Instance]) -> None:
    Domain.objects.create(name="bob.example.org", instance=world["bob"])
    alice = client("write", tenant="alice")
    assert alice.get("/api/domains/").json() == []
    assert alice.get("/api/domains/bob.example.org/").status_code == 404
    refused = alice.post(
        "/api/domains/", {"name": "a.example.org", "instance": "notes:bob"}, format="json"
    )
    assert refused.status_code == 403
    ok = alice.post(
        "/api/domains/", {"name": "a.example.org", "instance": "notes:alice"}, format="json"
    )
    assert ok.status_code == 201
    assert (
        client("read").post("/api/domains/", {"name": "c.example.org"}, format="json").status_code
        == 403
    )
    assert client("read").delete("/api/domains/a.example.org/").status_code == 403


@pytest.mark.django_db
def test_tls_status_without_tls(world: dict[str, Instance]) -> None:
    status = client("read").get("/api/tls/status").json()
    # Upstream's shape first.
    assert status["enabled"] is False
    assert {"domain", "staging", "https_port", "http_port", "recommendation"} <= set(status)
    assert "[settings.tls]" in status["recommendation"]
    assert client("read", tenant="alice").get("/api/tls/status").status_code == 403
    assert APIClient().get("/api/tls/status").status_code == 401


@pytest.mark.django_db
def test_dashboard_page_adds_lists_and_removes(world: dict[str, Instance]) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    anonymous = Client(HTTP_HOST="localhost")
    assert anonymous.get("/tls/").status_code == 302  # staff login first
    staff = Client(HTTP_HOST="localhost")
    staff.force_login(User.objects.create_user("op", password="x", is_staff=True))
    page = staff.get("/tls/").content.decode()
    assert "TLS is off" in page and "No custom domains." in page

    refused = staff.post(
        "/tls/",
        {"name": "bob.notes.example.com", "instance": "notes:alice", "verification": "none"},
    )
    assert refused.status_code == 200
    assert "under this server&#x27;s domain" in refused.content.decode()
    assert not Domain.objects.exists()

    added = staff.post(
        "/tls/", {"name": "notes.alice-corp.com", "instance": "notes:alice", "verification": "none"}
    )
    assert added.status_code == 302
    page = staff.get("/tls/").content.decode()
    assert 'data-domain="notes.alice-corp.com"' in page and "notes:alice" in page

    assert staff.post("/tls/domains/notes.alice-corp.com/remove/").status_code == 302
    assert not Domain.objects.exists()

    # TXT verification: the page shows the record to publish and a Verify button.
    staff.post("/tls/", {"name": "b.example.org", "instance": "notes:bob", "verification": "txt"})
    pending = Domain.objects.get(name="b.example.org")
    page = staff.get("/tls/").content.decode()
    assert pending.txt_value in page and "/tls/domains/b.example.org/verify/" in page


@pytest.fixture
def dns_server(short_tmp: Path, settings: Any) -> Iterator[Pebble]:
    """pebble-challtestsrv as the DNS server verification asks (its API sets TXT records)."""
    folder = short_tmp / "dns"
    folder.mkdir()
    server = Pebble(folder, http_port=0)
    try:
        server.start_challtestsrv()
        settings.TENEMENT_DNS_RESOLVER = f"127.0.0.1:{server.dns_port}"
        yield server
    finally:
        server.cleanup()


@pytest.mark.django_db
@pytest.mark.timeout(60)
def test_txt_verification_before_routing(world: dict[str, Instance], dns_server: Pebble) -> None:
    api = client("write")
    added = api.post(
        "/api/domains/",
        {"name": "notes.alice-corp.com", "instance": "notes:alice", "verification": "txt"},
        format="json",
    ).json()
    assert added["routed"] is False
    record = added["txt_record"]
    assert record["name"] == "_tenement-verify.notes.alice-corp.com"
    routed = list(Domain.objects.filter(ROUTED).values_list("name", flat=True))
    assert routed == []  # not routed, so no certificate either

    # Nothing published yet, then the wrong value: refused, saying what DNS has.
    missing = api.post("/api/domains/notes.alice-corp.com/verify/")
    assert missing.status_code == 400
    assert "no TXT record" in missing.json()["error"]["fields"]["name"][0]
    dns_server.set_txt(record["name"], "tenement-verify=someone-elses")
    wrong = api.post("/api/domains/notes.alice-corp.com/verify/")
    assert "someone-elses" in wrong.json()["error"]["fields"]["name"][0]

    dns_server.set_txt(record["name"], record["value"])
    verified = api.post("/api/domains/notes.alice-corp.com/verify/")
    assert verified.status_code == 200, verified.content
    assert verified.json()["routed"] is True
    routed = list(Domain.objects.filter(ROUTED).values_list("name", flat=True))
    assert routed == ["notes.alice-corp.com"]
    assert client("read").post("/api/domains/notes.alice-corp.com/verify/").status_code == 403


@pytest.mark.django_db
def test_status_page_and_api_with_tls_on(world: dict[str, Instance], tmp_path: Path) -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from proxy.tls import manager as tls_manager
    from proxy.tls.config import TlsConfig
    from proxy.tls.store import self_signed

    config = TlsConfig(
        domain="example.com",
        email="ops@example.com",
        directory_url="https://ca.example/dir",
        cache_dir=tmp_path / "acme",
        https_port=443,
        http_port=80,
        on_demand=True,
        wildcard=False,
        dns_hook=(),
        cert_file=None,
        key_file=None,
        redirect_http=True,
        orders_per_hour=30,
        handshake_wait=10,
        staging=False,
    )

    async def nobody(name: str) -> None:
        return None

    manager = tls_manager.CertManager(config, nobody)
    manager.load()
    manager.install(manager.store.save(("example.com",), *self_signed(["example.com"])), "acme")
    manager.failed(("alice.notes.example.com",), "the CA refused: rate limited")
    tls_manager.set_current(manager)
    try:
        status = client("read").get("/api/tls/status").json()
        assert status["enabled"] is True and status["recommendation"] is None
        assert status["domain"] == "example.com" and status["redirect_http"] is True
        by_names = {tuple(c["names"]): c for c in status["certificates"]}
        assert by_names[("example.com",)]["issuer"] == "tenement self-signed"
        assert by_names[("example.com",)]["next_renewal"] is not None
        failing = by_names[("alice.notes.example.com",)]
        assert failing["last_error"] == "the CA refused: rate limited"
        assert failing["not_after"] is None and failing["retry_in_seconds"] > 0
        assert status["orders"] == {"failed": 1}

        staff = Client(HTTP_HOST="localhost")
        staff.force_login(User.objects.create_user("op", password="x", is_staff=True))
        page = staff.get("/tls/").content.decode()
        assert "https://ca.example/dir" in page
        assert "alice.notes.example.com" in page and "rate limited" in page
    finally:
        tls_manager.set_current(None)
