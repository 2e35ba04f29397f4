from __future__ import annotations

import pytest

from instances.ids import InstanceKey
from routing.hosts import Control, MalformedHost, Tenant, Unknown, Weighted, normalize, resolve


@pytest.mark.parametrize(
    ("host", "route"),
    [
        ("alice.notes.example.com", Tenant(InstanceKey("notes", "alice"))),
        ("ALICE.Notes.Example.COM", Tenant(InstanceKey("notes", "alice"))),
        ("alice.notes.example.com:8443", Tenant(InstanceKey("notes", "alice"))),
        ("alice.notes.example.com.", Tenant(InstanceKey("notes", "alice"))),
        ("alice.notes.example.com.:80", Tenant(InstanceKey("notes", "alice"))),
        ("example.com", Control()),
        ("example.com:8000", Control()),
        ("127.0.0.1:8000", Control()),
        ("[::1]:8000", Control()),
        ("notes.example.com", Weighted("notes")),  # upstream's weighted service host
        ("a.b.notes.example.com", Unknown("a.b.notes.example.com")),
        ("other.org", Unknown("other.org")),
        ("badexample.com", Unknown("badexample.com")),
    ],
)
def test_resolve(host: str, route: object) -> None:
    assert resolve(host, "example.com") == route


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "alice..notes.example.com",
        ".example.com",
        "alice.notes.example.com..",
        "a/b.example.com",
        "a%2e.example.com",
        "a\x00.example.com",
        "a\r\n.example.com",
        "a b.example.com",
        "user@example.com",
        "example.com:",
        "example.com:0",
        "example.com:99999",
        "example.com:8o",
        "[::1",
        "[zz::1]:80",
        "[::1]x",
        "é.example.com",
        "a" * 64 + ".example.com",
        "-a.notes.example.com",
        "a-.example.com",
        "a_b.example.com",
        ("a." * 130) + "com",
    ],
)
def test_malformed_hosts(host: str) -> None:
    with pytest.raises(MalformedHost):
        normalize(host)


def test_localhost_domain() -> None:
    assert resolve("alice.counter.localhost:8000", "localhost") == Tenant(
        InstanceKey("counter", "alice")
    )
    assert resolve("localhost", "localhost") == Control()
