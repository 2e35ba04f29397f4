"""Dashboard pages in-process: instance detail, log search and tokens (issue 5).

The live tail and the copy button run in a browser; the Playwright tests cover them.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.test.html import Element, parse_html

from instances import tokens
from instances.dashboard.detail import dir_size
from instances.models import ApiToken, Event, Instance, LogLine, Service

pytestmark = [pytest.mark.django_db, pytest.mark.timeout(60)]

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HOST = "localhost"


# --- helpers -------------------------------------------------------------------------


def find_all(node: Element | str, tag: str, **attrs: str) -> list[Element]:
    """Elements named tag whose attributes include attrs (class_ matches one class)."""
    if isinstance(node, str):
        return []
    found = [node] if node.name == tag and _has(node, attrs) else []
    for child in node.children:
        found += find_all(child, tag, **attrs)
    return found


def _has(node: Element, attrs: dict[str, str]) -> bool:
    have = dict(node.attributes)
    for name, value in attrs.items():
        if name == "class_":
            if value not in (have.get("class") or "").split():
                return False
        elif have.get(name.replace("_", "-")) != value:
            return False
    return True


def find(node: Element | str, tag: str, **attrs: str) -> Element:
    found = find_all(node, tag, **attrs)
    assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
    return found[0]


def text(node: Element | str) -> str:
    if isinstance(node, str):
        return node
    return " ".join(text(child) for child in node.children)


def page(response: Any) -> Element:
    assert response.status_code == 200, response.status_code
    return parse_html(response.content.decode())


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture
def staff() -> Client:
    user = User.objects.create_user("op", password="pw-not-used", is_staff=True)
    client = Client(HTTP_HOST=HOST)
    client.force_login(user)
    return client


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Instance]:
    service = Service.objects.create(name="notes", command="true", data_dir=str(tmp_path))
    rows = {t: Instance.objects.create(service=service, instance_id=t) for t in ("alice", "bob")}
    return rows


def add_lines(instance: Instance, texts: list[str], stream: str = "stdout", **kw: Any) -> None:
    start = kw.get("start", T0)
    LogLine.objects.bulk_create(
        LogLine(instance=instance, stream=stream, time=start + timedelta(seconds=i), text=t)
        for i, t in enumerate(texts)
    )


# --- login ---------------------------------------------------------------------------

PAGES = ["/instances/notes:alice/", "/logs/", "/logs/?q=x", "/tokens/"]


@pytest.mark.parametrize("url", PAGES)
def test_every_page_needs_a_staff_login(world: dict, url: str) -> None:
    anonymous = Client(HTTP_HOST=HOST)
    response = anonymous.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")
    plain = User.objects.create_user("plain", password="x")
    anonymous.force_login(plain)
    assert anonymous.get(url).status_code == 302  # logged in, but not staff


def test_posts_need_a_staff_login(world: dict) -> None:
    tokens.mint("keep", "read")
    anonymous = Client(HTTP_HOST=HOST)
    assert anonymous.post("/tokens/keep/revoke/").status_code == 302
    assert anonymous.post("/tokens/", {"name": "sneaky", "scope": "admin"}).status_code == 302
    assert ApiToken.objects.get(name="keep").revoked_at is None
    assert not ApiToken.objects.filter(name="sneaky").exists()


# --- instance detail -----------------------------------------------------------------


def test_detail_shows_the_last_200_of_250_lines_oldest_first(world: dict, staff: Client) -> None:
    alice = world["alice"]
    add_lines(alice, [f"line {i:03d}" for i in range(250)])
    add_lines(world["bob"], ["bob's line"])
    doc = page(staff.get("/instances/notes:alice/"))
    tail = find(doc, "ol", id="log-tail")
    lines = find_all(tail, "li", class_="log-line")
    assert [text(find(li, "span", class_="text")) for li in lines] == [
        f"line {i:03d}" for i in range(50, 250)
    ]
    last = LogLine.objects.filter(instance=alice).order_by("-id").first()
    assert dict(tail.attributes)["data-last-id"] == str(last.id)
    assert dict(tail.attributes)["aria-live"] == "polite"
    assert dict(tail.attributes)["data-instance"] == "notes:alice"
    assert text(find(doc, "span", id="tail-status")) == "following"
    find(doc, "button", id="tail-toggle")


def test_detail_shows_state_events_newest_first_and_actions(world: dict, staff: Client) -> None:
    alice = world["alice"]
    Instance.objects.filter(pk=alice.pk).update(
        state="failed", last_exit_code=3, last_error="exited with code 3", health_ok=False
    )
    for i in range(60):
        Event.objects.create(instance=alice, kind="k", message=f"event {i:02d}")
    doc = page(staff.get("/instances/notes:alice/"))
    assert text(find(doc, "span", id="instance-state")) == "failed"
    rows = find_all(find(find(doc, "table", id="events"), "tbody"), "tr")
    assert [text(r.children[-1]) for r in rows] == [f"event {i:02d}" for i in range(59, 9, -1)]
    assert text(find(doc, "dd", id="health")).startswith("failing")
    assert "exited with code 3" in text(doc)
    forms = find_all(doc, "form", action="/instances/notes:alice/action/")
    asks = {}
    for form in forms:
        [button] = find_all(form, "button")
        action = dict(button.attributes)["data-action"]
        assert dict(find(form, "input", name="action").attributes)["value"] == action
        asks[action] = "data-confirm" in dict(form.attributes)
    # Only what applies to a failed instance; only the destructive one asks first.
    assert asks == {"start": False, "deregister": True}


def test_detail_shows_data_dir_and_size_and_the_tenant_url(
    world: dict, staff: Client, tmp_path: Path
) -> None:
    data = tmp_path / "notes" / "alice"
    (data / "sub").mkdir(parents=True)
    (data / "a.bin").write_bytes(b"x" * 3000)
    (data / "sub" / "b.bin").write_bytes(b"y" * 2000)
    doc = page(staff.get("/instances/notes:alice/", HTTP_HOST="localhost:8123"))
    assert text(find(doc, "code", id="data-dir")) == str(data)
    assert text(find(doc, "dd", id="data-size")) == "4.9\xa0KB in 3 entries"
    link = find(doc, "a", id="tenant-link")
    assert dict(link.attributes)["href"] == "http://alice.notes.localhost:8123/"
    bob = page(staff.get("/instances/notes:bob/"))
    assert text(find(bob, "dd", id="data-size")) == "not created yet"


def test_detail_shows_how_the_instance_is_isolated(world: dict, staff: Client) -> None:
    doc = page(staff.get("/instances/notes:alice/"))
    assert text(find(doc, "dd", id="isolation")) == "namespace (not started yet)"
    Instance.objects.filter(pk=world["alice"].pk).update(
        isolation="namespace, uid 200001, network none, memory 64 MiB, cgroup v1", uid=200001
    )
    doc = page(staff.get("/instances/notes:alice/"))
    assert text(find(doc, "dd", id="isolation")) == (
        "namespace, uid 200001, network none, memory 64 MiB, cgroup v1"
    )


def test_dir_size_is_capped_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "big").write_bytes(b"z" * 1_000_000)
    (root / "small").write_bytes(b"s" * 100)
    os.symlink(outside, root / "link-to-dir")
    os.symlink(outside / "big", root / "link-to-file")
    whole = dir_size(root)
    assert whole.complete and whole.entries == 3
    assert whole.bytes < 1000  # the links' own sizes, not what they point at
    for i in range(50):
        (root / f"f{i}").write_bytes(b"1")
    capped = dir_size(root, max_entries=10)
    assert not capped.complete and capped.entries == 10


@pytest.mark.parametrize(
    "key",
    ["notes:nobody", "nobody:alice", "notes", "NOTES:alice", "notes:..", "..:alice", "a:b:c"],
)
def test_detail_is_404_for_unknown_and_malformed_keys(world: dict, staff: Client, key: str) -> None:
    response = staff.get(f"/instances/{key}/")
    assert response.status_code == 404
    assert b"Traceback" not in response.content


def test_detail_is_404_for_keys_with_a_slash(world: dict, staff: Client) -> None:
    for url in (
        "/instances/notes:alice/../",
        "/instances/notes%2Falice/",
        "/instances/notes/alice/",
    ):
        assert staff.get(url).status_code == 404, url


# --- log search ----------------------------------------------------------------------


def hits(doc: Element) -> list[Element]:
    return find_all(find(doc, "ol", id="results"), "li", class_="hit")


def test_search_finds_and_highlights_a_word(world: dict, staff: Client) -> None:
    add_lines(world["alice"], ["GET /index 200", "payment declined for order 7", "GET /x 404"])
    doc = page(staff.get("/logs/", {"q": "declined"}))
    [hit] = hits(doc)
    assert [text(m) for m in find_all(hit, "mark")] == ["declined"]
    link = find(hit, "a")
    assert dict(link.attributes)["href"] == "/instances/notes:alice/"
    assert "stdout" in text(hit)
    assert not find_all(doc, "section", id="search-help")


def test_search_escapes_html_in_lines(world: dict, staff: Client) -> None:
    add_lines(world["alice"], ['<script>alert("x")</script> boom <b>bold</b>'])
    response = staff.get("/logs/", {"q": "boom"})
    body = response.content.decode()
    assert "&lt;script&gt;alert(" in body
    assert "<script>alert" not in body and "<b>bold" not in body
    [hit] = hits(page(response))
    assert [text(m) for m in find_all(hit, "mark")] == ["boom"]
    # The listing (no words) escapes too.
    listing = staff.get("/logs/", {"stream": "stdout"}).content.decode()
    assert "&lt;script&gt;alert(" in listing and "<script>alert" not in listing


def test_search_filters_by_instance_stream_and_time(world: dict, staff: Client) -> None:
    alice, bob = world["alice"], world["bob"]
    add_lines(alice, ["deploy started early"], start=T0)
    add_lines(alice, ["deploy failed loudly"], stream="stderr", start=T0 + timedelta(hours=1))
    add_lines(bob, ["deploy started by bob"], start=T0 + timedelta(hours=2))

    def found(**params: str) -> list[str]:
        doc = page(staff.get("/logs/", {"q": "deploy", **params}))
        return sorted(text(find(h, "div", class_="snippet")) for h in hits(doc))

    assert len(found()) == 3
    assert found(instance="notes:bob") == ["deploy started by bob"]
    assert found(stream="stderr") == ["deploy failed loudly"]
    assert found(since="2026-01-01T12:30", until="2026-01-01T13:30") == ["deploy failed loudly"]
    assert found(since="2026-01-01T13:30") == ["deploy started by bob"]
    assert found(instance="notes:alice", order="ranked") == [
        "deploy failed loudly",
        "deploy started early",
    ]


def test_search_pages_back_with_older(world: dict, staff: Client) -> None:
    add_lines(world["alice"], [f"request {i:03d} served" for i in range(120)])
    add_lines(world["alice"], ["unrelated noise"] * 10)
    seen: list[str] = []
    url, params = "/logs/", {"q": "served"}
    for expected in (50, 50, 20):
        doc = page(staff.get(url, params))
        seen += [text(find(h, "div", class_="snippet")) for h in hits(doc)]
        assert len(hits(doc)) == expected
        older = find_all(doc, "a", id="older")
        if expected < 50:
            assert not older
            break
        url, params = dict(older[0].attributes)["href"], {}
    assert seen == [f"request {i:03d} served" for i in range(119, -1, -1)]
    # Keyset paging keeps the filters in the link.
    assert "q=served" in url


def test_search_without_words_lists_the_newest_lines(world: dict, staff: Client) -> None:
    add_lines(world["alice"], [f"n{i}" for i in range(60)])
    doc = page(staff.get("/logs/", {"instance": "notes:alice"}))
    assert [text(find(h, "div", class_="snippet")) for h in hits(doc)][:3] == ["n59", "n58", "n57"]
    assert len(hits(doc)) == 50 and find_all(doc, "a", id="older")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"q": "x", "instance": "notes:nobody"}, "notes:nobody is not registered"),
        ({"q": "x", "instance": "Not A Key"}, "invalid instance key"),
        ({"q": "x", "instance": "notes:../etc"}, "invalid instance id"),
        ({"q": "x", "since": "yesterday"}, "Enter a valid date/time"),
        ({"q": "x", "since": "2026-01-02T00:00", "until": "2026-01-01T00:00"}, "later than"),
        ({"q": "x", "stream": "stdin"}, "Select a valid choice"),
        ({"q": "x", "before": "-1"}, "greater than or equal to 1"),
        ({"q": "x", "order": "ranked", "before": "5"}, "Paging needs newest first"),
        ({"q": "-only -excluded"}, "Nothing to search for"),
        ({"q": '"' * 1001}, "at most 1000 characters"),
        ({"q": " ".join(f"w{i}" for i in range(40))}, "Too many search terms"),
    ],
)
def test_bad_search_input_gets_a_clear_message(
    world: dict, staff: Client, params: dict, message: str
) -> None:
    response = staff.get("/logs/", params)
    assert response.status_code == 200
    assert message in text(page(response))
    assert not find_all(page(response), "ol", id="results")


def test_the_empty_page_explains_the_syntax(world: dict, staff: Client) -> None:
    doc = page(staff.get("/logs/"))
    help_text = text(find(doc, "section", id="search-help"))
    assert '"connection refused"' in help_text and "-healthz" in help_text
    for field in ("q", "instance", "since", "until"):
        find(doc, "input", id=field)
    labels = {dict(x.attributes).get("for") for x in find_all(doc, "label")}
    assert {"q", "instance", "stream", "since", "until", "order"} <= labels


def test_no_matches_says_so_and_shows_the_help(world: dict, staff: Client) -> None:
    add_lines(world["alice"], ["hello"])
    doc = page(staff.get("/logs/", {"q": "absent"}))
    assert text(find(doc, "p", id="no-matches")).startswith("No matches")
    find(doc, "section", id="search-help")


# --- tokens --------------------------------------------------------------------------


def test_a_new_token_is_shown_once_and_stored_only_as_a_hash(world: dict, staff: Client) -> None:
    response = staff.post("/tokens/", {"name": "ci", "scope": "write", "expires": "30"})
    doc = page(response)
    secret = text(find(doc, "code", id="new-token"))
    assert re.fullmatch(r"ten_[0-9a-f]{12}_\S{43,}", secret)
    find(doc, "button", id="copy-token")
    assert response["Cache-Control"] == "no-store"
    token = ApiToken.objects.get(name="ci")
    assert token.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert token.scope == "write" and token.expires_at is not None
    assert tokens.verify(secret) == token
    again = staff.get("/tokens/")
    assert secret not in again.content.decode()
    assert not find_all(page(again), "code", id="new-token")
    assert secret not in str(dict(staff.session.items()))
    row = find(page(again), "tr", data_token="ci")
    assert "write" in text(row) and token.prefix in text(row)


@pytest.mark.parametrize(
    ("form", "field", "message"),
    [
        ({"name": "dup", "scope": "read"}, "name", "already exists"),
        ({"name": "t", "scope": "admin", "tenant": "alice"}, "scope", "cannot have admin"),
        ({"name": "t", "scope": "read", "tenant": "Bad_Tenant"}, "tenant", "invalid tenant"),
        ({"name": "a/b", "scope": "read"}, "name", "must not contain '/'"),
        ({"name": "t", "scope": "root"}, "scope", "Select a valid choice"),
        ({"name": "", "scope": "read"}, "name", "This field is required"),
        ({"name": "t", "scope": "read", "expires": "0"}, "expires", "greater than or equal"),
        ({"name": "t", "scope": "read", "expires": "soon"}, "expires", "Enter a number"),
    ],
)
def test_bad_token_input_is_refused_with_a_message(
    world: dict, staff: Client, form: dict, field: str, message: str
) -> None:
    tokens.mint("dup", "read")
    doc = page(staff.post("/tokens/", form))
    assert not find_all(doc, "code", id="new-token")
    errors = find_all(doc, "p", class_="field-error")
    assert any(message in text(e) for e in errors), [text(e) for e in errors]
    assert ApiToken.objects.count() == 1


def test_revoke_needs_post_and_csrf_and_then_works(world: dict) -> None:
    tokens.mint("old one", "read")
    user = User.objects.create_user("op2", password="x", is_staff=True)
    strict = Client(HTTP_HOST=HOST, enforce_csrf_checks=True)
    strict.force_login(user)
    url = "/tokens/old%20one/revoke/"
    assert strict.get(url).status_code == 405
    assert strict.post(url).status_code == 403  # no CSRF token
    assert ApiToken.objects.get(name="old one").revoked_at is None
    doc = page(strict.get("/tokens/"))
    form = find_all(find(doc, "tr", data_token="old one"), "form")[0]
    assert dict(form.attributes)["action"] == url
    assert "Revoke token old one?" in dict(form.attributes)["data-confirm"]
    csrf = dict(find(form, "input", name="csrfmiddlewaretoken").attributes)["value"]
    response = strict.post(url, {"csrfmiddlewaretoken": csrf}, follow=True)
    assert ApiToken.objects.get(name="old one").revoked_at is not None
    assert "Revoked token 'old one'" in text(page(response))
    row = find(page(response), "tr", data_token="old one")
    assert "revoked" in text(row) and not find_all(row, "button", data_action="revoke")
    again = strict.post(url, {"csrfmiddlewaretoken": csrf}, follow=True)
    assert "no active token named 'old one'" in text(page(again))
