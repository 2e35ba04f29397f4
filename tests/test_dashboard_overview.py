"""Dashboard overview, add tenant, instance actions and releases: Django views through the
test client, and the live WebSocket through Channels' communicator on the real ASGI app."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client

from instances.ids import InstanceKey
from instances.models import Event, Instance, Service
from tenement_site.asgi import application
from tests.test_supervisor import make_service, supervising

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

HOST = "localhost"
PAGES = ["/", "/tenants/add/", "/releases/"]


@pytest.fixture
def notes(tmp_path: Path) -> Service:
    return Service.objects.create(name="notes", command="true", data_dir=str(tmp_path))


@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    client = Client(HTTP_HOST=HOST)
    client.force_login(user)
    return client


def add(service: Service, *ids: str, **fields: Any) -> list[Instance]:
    return Instance.objects.bulk_create(
        Instance(service=service, instance_id=i, **fields) for i in ids
    )


def rows(html: str) -> list[tuple[str, str]]:
    """(key, state) of every instance row, in page order."""
    return re.findall(r'<tr data-key="([^"]+)" data-state="([^"]+)"', html)


def count(html: str, name: str) -> int:
    match = re.search(rf'data-count="{name}"[^>]*><strong>(\d+)</strong>', html)
    assert match, f"no count {name}"
    return int(match.group(1))


def get(client: Client, url: str, **params: Any) -> str:
    response = client.get(url, params)
    assert response.status_code == 200, response.status_code
    return response.content.decode()


# ---- access ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", PAGES)
def test_pages_need_a_login(url: str) -> None:
    response = Client(HTTP_HOST=HOST).get(url)
    assert response.status_code == 302
    assert response["Location"] == f"/accounts/login/?next={url}"


def test_non_staff_users_are_sent_to_the_login_page(notes: Service) -> None:
    user = get_user_model().objects.create_user("tenant", password="pw")
    client = Client(HTTP_HOST=HOST)
    client.force_login(user)
    assert client.get("/").status_code == 302
    (alice,) = add(notes, "alice")
    response = client.post("/instances/notes:alice/action/", {"action": "stop"})
    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    alice.refresh_from_db()
    assert alice.desired_state == "stopped" and Instance.objects.count() == 1


@pytest.mark.parametrize("url", PAGES)
def test_pages_render_for_staff(staff: Client, notes: Service, url: str) -> None:
    assert "tenement" in get(staff, url)


# ---- overview --------------------------------------------------------------------------


def test_fifty_rows_a_page_and_pager_links(staff: Client, notes: Service) -> None:
    add(notes, *(f"t{i:03d}" for i in range(120)))
    first = get(staff, "/")
    assert [key for key, _ in rows(first)] == [f"notes:t{i:03d}" for i in range(50)]
    assert 'id="next-page" href="?page=2"' in first and 'id="prev-page"' not in first
    third = get(staff, "/", page=3)
    assert [key for key, _ in rows(third)] == [f"notes:t{i:03d}" for i in range(100, 120)]
    assert 'id="prev-page" href="?page=2"' in third and 'id="next-page"' not in third
    # Out of range or junk: the nearest real page, not an error.
    assert rows(get(staff, "/", page=99)) == rows(third)
    assert rows(get(staff, "/", page="x")) == rows(first)


def test_filters_by_id_substring_service_and_state(
    staff: Client, notes: Service, tmp_path: Path
) -> None:
    chat = Service.objects.create(name="chat", command="true", data_dir=str(tmp_path))
    add(notes, "alice", "bob", "malice")
    add(chat, "alice", state="running")
    Instance.objects.filter(instance_id="bob").update(state="failed")
    assert [k for k, _ in rows(get(staff, "/", q="lic"))] == [
        "chat:alice",
        "notes:alice",
        "notes:malice",
    ]
    assert [k for k, _ in rows(get(staff, "/", service="chat"))] == ["chat:alice"]
    assert rows(get(staff, "/", state="failed")) == [("notes:bob", "failed")]
    assert [k for k, _ in rows(get(staff, "/", q="ALI", service="notes"))] == [
        "notes:alice",
        "notes:malice",
    ]
    page = get(staff, "/", q="zzz")
    assert rows(page) == [] and "No instances match these filters." in page
    # An unknown state is no filter at all, not an error.
    assert len(rows(get(staff, "/", state="bogus"))) == 4
    # Pager links keep the filters.
    add(notes, *(f"x{i:03d}" for i in range(60)))
    assert 'id="next-page" href="?q=x&amp;page=2"' in get(staff, "/", q="x")


def test_counts_cover_all_instances_not_just_the_page(staff: Client, notes: Service) -> None:
    add(notes, *(f"r{i}" for i in range(55)), state="running", desired_state="running")
    add(notes, *(f"s{i}" for i in range(7)))
    add(notes, "f1", "f2", state="failed")
    add(notes, "b1", state="backoff")
    html = get(staff, "/", state="failed")
    assert count(html, "registered") == 65
    assert count(html, "running") == 55
    assert count(html, "sleeping") == 7
    assert count(html, "failed") == 2
    assert count(html, "backoff") == 1


def test_rows_show_state_link_and_actions(staff: Client, notes: Service) -> None:
    add(notes, "alice", state="failed", restart_count=4, last_error="exit 3")
    html = get(staff, "/")
    assert rows(html) == [("notes:alice", "failed")]
    assert '<span class="state state-failed" title="exit 3">failed</span>' in html
    assert '<a class="instance-link" href="/instances/notes:alice/">alice</a>' in html
    # Failed: only what applies (start clears it; stop and restart would do nothing).
    assert re.findall(r'data-action="(\w+)"', html) == ["start", "deregister"]
    assert html.count("data-confirm=") == 1  # deregister asks first
    assert 'id="live-status"' in html and 'id="add-tenant"' in html


# ---- actions ---------------------------------------------------------------------------


def post_action(client: Client, key: str, action: str, next_url: str = "/?q=al") -> Any:
    return client.post(f"/instances/{key}/action/", {"action": action, "next": next_url})


def test_actions_set_desired_state_and_redirect_back(staff: Client, notes: Service) -> None:
    (alice,) = add(notes, "alice", state="running", desired_state="running")
    response = post_action(staff, "notes:alice", "stop")
    assert response.status_code == 302 and response["Location"] == "/?q=al"
    assert [str(m) for m in get_messages(response.wsgi_request)] == ["Stopping notes:alice."]
    alice.refresh_from_db()
    assert alice.desired_state == "stopped"
    post_action(staff, "notes:alice", "start")
    alice.refresh_from_db()
    assert alice.desired_state == "running" and not alice.restart_requested
    post_action(staff, "notes:alice", "restart")
    alice.refresh_from_db()
    assert alice.desired_state == "running" and alice.restart_requested
    # The message is shown on the page redirected to.
    assert "Restarting notes:alice." in get(staff, "/")


def test_deregister_removes_the_row(staff: Client, notes: Service) -> None:
    add(notes, "alice", "bob")
    response = post_action(staff, "notes:alice", "deregister", "/instances/notes:alice/")
    assert response["Location"] == "/"  # its detail page is gone
    html = get(staff, "/")
    assert [k for k, _ in rows(html)] == ["notes:bob"]
    assert "Deregistered notes:alice; its data directory is kept." in html


def test_bad_actions_change_nothing(staff: Client, notes: Service) -> None:
    (alice,) = add(notes, "alice", state="running", desired_state="running")
    response = post_action(staff, "notes:alice", "explode")
    assert response.status_code == 400
    assert b"unknown action 'explode'" in response.content
    assert post_action(staff, "notes:zed", "stop").status_code == 404
    assert post_action(staff, "nope:alice", "stop").status_code == 404
    assert post_action(staff, "Notes:..", "deregister").status_code == 404
    assert staff.get("/instances/notes:alice/action/").status_code == 405
    # A foreign "next" is ignored.
    assert post_action(staff, "notes:alice", "start", "https://evil.example/")["Location"] == "/"
    alice.refresh_from_db()
    assert alice.desired_state == "running" and Instance.objects.count() == 1


def test_actions_need_csrf(notes: Service) -> None:
    add(notes, "alice", state="running", desired_state="running")
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    client = Client(HTTP_HOST=HOST, enforce_csrf_checks=True)
    client.force_login(user)
    assert post_action(client, "notes:alice", "stop").status_code == 403
    assert Instance.objects.get().desired_state == "running"


# ---- add tenant ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance_id", "error"),
    [
        ("a/b", "Invalid instance id &#x27;a/b&#x27;"),
        ("..", "Invalid instance id &#x27;..&#x27;"),
        ("Alice", "Invalid instance id &#x27;Alice&#x27;"),
        ("-x", "Invalid instance id"),
        ("", "This field is required."),
        ("a" * 64, "Ensure this value has at most 63 characters"),
    ],
)
def test_add_tenant_rejects_bad_ids(
    staff: Client, notes: Service, instance_id: str, error: str
) -> None:
    response = staff.post("/tenants/add/", {"service": "notes", "instance_id": instance_id})
    html = response.content.decode()
    assert response.status_code == 200
    assert re.search(r'<p class="field-error">[^<]*' + re.escape(error), html), html
    assert not Instance.objects.exists()


def test_add_tenant_rejects_unknown_service_and_duplicates(staff: Client, notes: Service) -> None:
    response = staff.post("/tenants/add/", {"service": "chat", "instance_id": "alice"})
    assert "No service named &#x27;chat&#x27;." in response.content.decode()
    add(notes, "alice")
    response = staff.post("/tenants/add/", {"service": "notes", "instance_id": "alice"})
    assert '<p class="field-error">notes:alice is already registered.</p>' in (
        response.content.decode()
    )
    assert Instance.objects.count() == 1


def test_add_tenant_registers_starts_and_shows_the_url(staff: Client, notes: Service) -> None:
    form = get(staff, "/tenants/add/")
    assert 'id="id_start" name="start" type="checkbox" checked' in form
    response = staff.post(
        "/tenants/add/",
        {"service": "notes", "instance_id": "alice", "start": "on"},
        HTTP_HOST="localhost:8123",
        follow=True,
    )
    html = response.content.decode()
    assert '<a id="tenant-url" href="http://alice.notes.localhost:8123/">' in html
    assert "notes:alice registered and starting." in html
    assert Instance.objects.get(instance_id="alice").desired_state == "running"
    # Unchecked: registered, left asleep; no port in the Host, none in the URL.
    response = staff.post("/tenants/add/", {"service": "notes", "instance_id": "bob"}, follow=True)
    assert '<a id="tenant-url" href="http://bob.notes.localhost/">' in response.content.decode()
    assert Instance.objects.get(instance_id="bob").desired_state == "stopped"


async def test_a_tenant_just_added_can_be_woken_at_once(short_tmp: Path) -> None:
    """The add page links to the tenant's URL at once: its first request must wake it even
    before the supervisor's next sync has seen the new row."""
    await sync_to_async(make_service)(short_tmp)
    user = await sync_to_async(get_user_model().objects.create_user)(
        "op", password="pw", is_staff=True
    )
    client = Client(HTTP_HOST=HOST)
    await sync_to_async(client.force_login)(user)
    async with supervising(short_tmp) as sup:
        form = {"service": "app", "instance_id": "frank", "start": "on"}
        response = await sync_to_async(client.post)("/tenants/add/", form)
        assert response.status_code == 302
        rt = await sup.wake(InstanceKey("app", "frank"), timeout=30)
        assert rt.ready.is_set() and rt.key == ("app", "frank")
        assert list(sup.runtimes) == [("app", "frank")]


# ---- releases --------------------------------------------------------------------------


def test_releases_weight_switch_rollback_and_pin(staff: Client, notes: Service) -> None:
    from instances.models import Release, ReleaseChange
    from routing import operations as release_ops

    add(notes, "alice", "bob", "carol")
    html = get(staff, "/releases/")
    assert "One release: its definition, serving all 3 tenants" in html
    release_ops.create("notes", {"name": "v2"}, "op")
    html = get(staff, "/releases/")
    assert re.search(r'<input id="weight-notes-v2" name="weight" type="range"[^>]*value="0"', html)
    post = staff.post
    response = post(
        "/releases/notes/action/", {"action": "weight", "release": "v2", "weight": "40"}
    )
    assert response.status_code == 302
    assert Release.objects.get(name="v2").weight == 40
    assert post("/releases/notes/action/", {"action": "switch", "release": "v2"}).status_code == 302
    assert Release.objects.get(name="v1").state == "draining"
    assert post("/releases/notes/action/", {"action": "rollback"}).status_code == 302
    assert Release.objects.get(name="v1").weight == 100
    # Refusals are messages, not errors; unknown names are 404.
    response = post("/releases/notes/action/", {"action": "weight", "release": "v1", "weight": "x"})
    assert response.status_code == 302 and Release.objects.get(name="v1").weight == 100
    assert post("/releases/notes/action/", {"action": "switch", "release": "zz"}).status_code == 404
    assert post("/instances/notes:alice/pin/", {"release": "v2"}).status_code == 302
    assert Instance.objects.get(instance_id="alice").release == "v2"
    assert 'value="v2" selected' in get(staff, "/instances/notes:alice/")
    assert {c.actor for c in ReleaseChange.objects.exclude(kind="create")} == {"op"}


# ---- live updates ----------------------------------------------------------------------


def session_headers(user: Any) -> list[tuple[bytes, bytes]]:
    client = Client(HTTP_HOST=HOST)
    client.force_login(user)
    client.get("/")  # sets the CSRF cookie, as the page does in a browser
    cookie = "; ".join(f"{c.key}={c.value}" for c in client.cookies.values())
    return [
        (b"host", HOST.encode()),
        (b"origin", f"http://{HOST}".encode()),
        (b"cookie", cookie.encode()),
    ]


async def open_socket(headers: list[tuple[bytes, bytes]], query: str = "") -> Any:
    path = "/ws/overview/" + (f"?{query}" if query else "")
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=10)
    assert connected
    return communicator


async def test_websocket_refuses_non_staff() -> None:
    user = await sync_to_async(get_user_model().objects.create_user)("tenant", password="pw")
    anonymous = [(b"host", b"localhost"), (b"origin", b"http://localhost")]
    for headers in (await sync_to_async(session_headers)(user), anonymous):
        communicator = await open_socket(headers)
        try:
            closed = await communicator.receive_output(timeout=5)
            assert closed == {"type": "websocket.close", "code": 4403}
        finally:
            await communicator.disconnect()


async def test_a_state_change_reaches_an_open_websocket_within_a_second(
    notes: Service,
) -> None:
    user = await sync_to_async(get_user_model().objects.create_user)(
        "op", password="pw", is_staff=True
    )
    await sync_to_async(add)(notes, "alice", "bob", "zed")
    communicator = await open_socket(await sync_to_async(session_headers)(user), "q=b")
    try:
        first = await communicator.receive_json_from(timeout=10)
        assert rows(first["html"]) == [("notes:bob", "stopped")]  # the page's filters apply
        assert first["counts"]["sleeping"] == 3
        # The CSRF token lets the re-rendered forms post.
        assert re.search(r'name="csrfmiddlewaretoken" value="\w{64}"', first["html"])
        # What the supervisor does on a transition: an .update() of state plus an Event.
        pk = await sync_to_async(Instance.objects.get)(instance_id="bob")
        changed_at = time.monotonic()
        await sync_to_async(transition)(pk.pk, "stopped", "starting")
        update = await communicator.receive_json_from(timeout=5)
        assert time.monotonic() - changed_at < 1.0
        assert rows(update["html"]) == [("notes:bob", "starting")]
        assert update["counts"]["starting"] == 1 and update["counts"]["sleeping"] == 2
        # A deregistration elsewhere (no event left behind) is noticed too.
        await sync_to_async(Instance.objects.filter(instance_id="bob").delete)()
        update = await communicator.receive_json_from(timeout=5)
        assert rows(update["html"]) == [] and update["counts"]["registered"] == 2
    finally:
        await communicator.disconnect()


async def test_websocket_stays_quiet_without_changes_and_stops_on_disconnect(
    notes: Service,
) -> None:
    user = await sync_to_async(get_user_model().objects.create_user)(
        "op", password="pw", is_staff=True
    )
    communicator = await open_socket(await sync_to_async(session_headers)(user))
    await communicator.receive_json_from(timeout=10)
    # Nothing changed: the next message is the periodic refresh, not one per poll.
    assert await communicator.receive_nothing(timeout=2)
    await communicator.disconnect()
    await asyncio.sleep(0)
    watchers = [t for t in asyncio.all_tasks() if t.get_name().startswith("overview-watch-")]
    assert watchers == []


def transition(pk: int, old: str, new: str) -> None:
    Instance.objects.filter(pk=pk).update(state=new)
    Event.objects.create(instance_id=pk, kind=new, from_state=old, to_state=new)
