"""[settings.tls] parsing and checks, and the manager's pure rules (no network)."""

from __future__ import annotations

import asyncio
import datetime
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from instances.config import ConfigError, load_config
from proxy.tls.config import LETS_ENCRYPT, LETS_ENCRYPT_STAGING
from proxy.tls.manager import BACKOFF_BASE, CertManager, Orders
from proxy.tls.store import StoredCert, matches, self_signed

SERVICE = """
[service.web]
command = "/bin/true"
"""


@pytest.fixture(autouse=True)
def domain(settings: Any) -> None:
    settings.TENEMENT_DOMAIN = "tenement.test"


def load(tmp: Path, tls: str) -> Any:
    path = tmp / "tenement.toml"
    path.write_text(textwrap.dedent(f"[settings.tls]\n{tls}\n{SERVICE}"))
    return load_config(path, tmp / "data")


def problems(tmp: Path, tls: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp, tls)
    return str(e.value)


def test_disabled_by_default_and_upstream_keys_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, "").tls is None
    upstream = """
    enabled = false
    acme_email = "ops@tenement.test"
    domain = "tenement.test"
    cache_dir = "/var/lib/tenement/acme"
    staging = true
    https_port = 8443
    http_port = 8080
    """
    assert load(tmp_path, upstream).tls is None


def test_enabled_defaults(tmp_path: Path) -> None:
    tls = load(tmp_path, 'enabled = true\nacme_email = "ops@tenement.test"').tls
    assert tls.domain == "tenement.test"
    assert tls.cache_dir == tmp_path / "data" / "acme"
    assert tls.directory_url == LETS_ENCRYPT
    assert (tls.https_port, tls.http_port) == (443, 80)
    assert tls.on_demand and not tls.wildcard and not tls.redirect_http
    staged = load(tmp_path, 'enabled = true\nacme_email = "a@b.c"\nstaging = true\ncache_dir = "c"')
    assert staged.tls.directory_url == LETS_ENCRYPT_STAGING
    assert staged.tls.cache_dir == tmp_path / "c"  # relative to the config file


@pytest.mark.parametrize(
    "tls, expected",
    [
        ("enabled = true", "settings.tls.acme_email: required"),
        (
            'enabled = true\nacme_email = "a@b.c"\ndomain = "other.test"',
            "settings.tls.domain: must be the control domain ('tenement.test'",
        ),
        ('enabled = true\nacme_email = "a@b.c"\ndns_provider = "cloudflare"', "dns_hook"),
        (
            'enabled = true\nacme_email = "a@b.c"\nstaging = true\ndirectory_url = "https://x/"',
            "give staging = true or directory_url, not both",
        ),
        ('enabled = true\nacme_email = "a@b.c"\nwildcard = true', "wildcard: wildcard"),
        ('enabled = true\nacme_email = "a@b.c"\ndns_hook = "/nonexistent/hook"', "executable"),
        ('enabled = true\nacme_email = "a@b.c"\ncert_file = "/etc/hostname"', "key_file, or"),
        ('enabled = true\nacme_email = "a@b.c"\ndirectory_url = "ftp://x"', "http(s) URL"),
        ("redirect_https = true", "did you mean 'redirect_http'"),
        ("https_port = 0", "settings.tls.https_port"),
        ("handshake_wait = 0", "settings.tls.handshake_wait"),
    ],
)
def test_refused_with_the_key_and_why(tmp_path: Path, tls: str, expected: str) -> None:
    assert expected in problems(tmp_path, tls)


def test_localhost_cannot_have_a_certificate(tmp_path: Path, settings: Any) -> None:
    settings.TENEMENT_DOMAIN = "localhost"
    assert "a CA cannot issue for 'localhost'" in problems(
        tmp_path, 'enabled = true\nacme_email = "a@b.c"'
    )


def test_wildcard_patterns_cover_one_label() -> None:
    assert matches("*.notes.example.com", "alice.notes.example.com")
    assert not matches("*.notes.example.com", "notes.example.com")
    assert not matches("*.notes.example.com", "a.b.notes.example.com")
    assert matches("example.com", "example.com")


def test_orders_capped_per_hour() -> None:
    orders = Orders(limit=2)
    assert orders.allow(0) and orders.allow(1)
    assert not orders.allow(2)
    assert orders.allow(3601)  # the first has aged out


def cert(names: tuple[str, ...], days_left: float, lifetime: float = 90) -> StoredCert:
    now = datetime.datetime.now(datetime.UTC)
    after = now + datetime.timedelta(days=days_left)
    before = after - datetime.timedelta(days=lifetime)
    return StoredCert(Path("/x.crt"), Path("/x.key"), names, "CA", before, after)


def test_renewal_when_a_third_of_the_lifetime_is_left() -> None:
    assert cert(("a.test",), days_left=31).renew_at() > datetime.datetime.now(datetime.UTC)
    assert cert(("a.test",), days_left=29).renew_at() < datetime.datetime.now(datetime.UTC)


async def test_backoff_doubles_and_status_says_why(tmp_path: Path) -> None:
    config = load(
        tmp_path, f'enabled = true\nacme_email = "a@b.c"\ncache_dir = "{tmp_path / "acme"}"'
    ).tls
    now = [1000.0]

    async def nobody(name: str) -> None:
        return None

    manager = CertManager(config, nobody, clock=lambda: now[0])
    names = ("tenement.test",)
    manager.failed(names, "the CA refused: rate limited")
    assert manager.failures[names].retry_at == 1000 + BACKOFF_BASE
    assert manager.order(names) is None  # backing off
    manager.failed(names, "again")
    assert manager.failures[names].retry_at == 1000 + 2 * BACKOFF_BASE
    [row] = manager.status()
    assert row["last_error"] == "again" and row["retry_in_seconds"] == 2 * BACKOFF_BASE
    assert manager.outcomes["failed"] == 2
    await asyncio.sleep(0)


def test_offline_config_check_knows_the_tls_keys(tmp_path: Path) -> None:
    from instances.cli import configcheck
    from proxy.tls.config import TlsTable

    assert set(configcheck.TLS) == set(TlsTable.model_fields)
    problems = configcheck.check_tables(
        {"settings": {"tls": {"enabled": "yes", "redirect_https": True}}}
    )
    assert problems == [
        "settings.tls.enabled: must be true or false (got 'yes')",
        "settings.tls.redirect_https: unknown key (did you mean 'redirect_http'?)",
    ]


async def test_handshakes_share_one_order_and_wait_bounded(tmp_path: Path) -> None:
    """A slow CA: concurrent handshakes for one name place one order, wait handshake_wait,
    then get the fallback; the order goes on and its certificate serves the next ones."""
    config = load(
        tmp_path,
        f'enabled = true\nacme_email = "a@b.c"\nhandshake_wait = 0.3\ncache_dir = "{tmp_path}/c"',
    ).tls
    alice = "alice.web.tenement.test"

    async def registered(name: str) -> tuple[str, ...] | None:
        return (name,) if name == alice else None

    manager = CertManager(config, registered)
    manager.load()
    release = threading.Event()
    calls: list[tuple[str, ...]] = []
    real_store = manager.store

    def slow_issue(names: tuple[str, ...]) -> StoredCert:
        calls.append(names)
        release.wait(10)  # the CA takes its time
        return real_store.save(names, *self_signed(list(names)))

    manager.issuer.issue = slow_issue  # type: ignore[method-assign]
    began = time.monotonic()
    contexts = await asyncio.gather(*(manager.context_for(alice) for _ in range(5)))
    waited = time.monotonic() - began
    assert 0.3 <= waited < 2
    assert all(c is manager.fallback for c in contexts)
    assert calls == [(alice,)]  # one order for five handshakes
    assert await manager.context_for("stranger.web.tenement.test") is manager.fallback
    release.set()
    await asyncio.wait_for(manager.pending[(alice,)], 10)
    assert await manager.context_for(alice) is manager.served[(alice,)].context
    assert calls == [(alice,)]


def test_lookup_exact_then_wildcard_own_certificate_first(tmp_path: Path) -> None:
    config = load(tmp_path, f'enabled = true\nacme_email = "a@b.c"\ncache_dir = "{tmp_path}/c"').tls

    async def nobody(name: str) -> None:
        return None

    manager = CertManager(config, nobody)
    manager.store.prepare()
    wildcard = manager.install(
        manager.store.save(("*.web.tenement.test",), *self_signed(["*.web.tenement.test"])), "acme"
    )
    exact = manager.install(
        manager.store.save(("alice.web.tenement.test",), *self_signed(["alice.web.tenement.test"])),
        "acme",
    )
    assert manager.lookup("alice.web.tenement.test") is exact
    assert manager.lookup("bob.web.tenement.test") is wildcard
    assert manager.lookup("a.bob.web.tenement.test") is None
    assert manager.lookup("web.tenement.test") is None
    own_pem = self_signed(["alice.web.tenement.test"], days=1)
    own = manager.install(
        manager.store.save(("alice.web.tenement.test", "x.test"), *own_pem), "file"
    )
    assert manager.lookup("alice.web.tenement.test") is own  # the operator's, though shorter


async def test_renewal_retires_names_no_longer_served(tmp_path: Path) -> None:
    config = load(tmp_path, f'enabled = true\nacme_email = "a@b.c"\ncache_dir = "{tmp_path}/c"').tls
    gone = ("zed.web.tenement.test",)

    async def nobody(name: str) -> None:
        return None

    async def wanted(names: tuple[str, ...]) -> bool:
        return names != gone

    manager = CertManager(config, nobody, wanted=wanted)
    manager.store.prepare()
    own = manager.install(
        manager.store.save(("tenement.test",), *self_signed(["tenement.test"])), "file"
    )
    due = manager.install(manager.store.save(gone, *self_signed(list(gone), days=0)), "acme")
    assert due.cert.renew_at() < datetime.datetime.now(datetime.UTC)
    assert await manager.renew() == 0  # nothing ordered for a tenant that is gone ...
    assert manager.lookup(gone[0]) is None  # ... and its certificate is retired
    assert not due.cert.cert_path.exists() and not due.cert.key_path.exists()
    assert manager.lookup("tenement.test") is own


async def test_on_demand_orders_capped_per_hour(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f'enabled = true\nacme_email = "a@b.c"\norders_per_hour = 1\ncache_dir = "{tmp_path}/c"',
    ).tls

    async def registered(name: str) -> tuple[str, ...]:
        return (name,)

    manager = CertManager(config, registered)
    manager.load()
    manager.issuer.issue = lambda names: manager.store.save(  # type: ignore[method-assign]
        names, *self_signed(list(names))
    )
    first = await manager.context_for("a.web.tenement.test")
    assert first is manager.served[("a.web.tenement.test",)].context
    second = await manager.context_for("b.web.tenement.test")
    assert second is manager.fallback  # over the cap: no order placed
    assert manager.outcomes == {"issued": 1, "capped": 1}
    assert ("b.web.tenement.test",) not in manager.pending
