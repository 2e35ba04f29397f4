"""The control host's guards, in-process: same-origin WebSockets, bodies bounded before
Django, the API's error shapes for bad JSON and a full database, login throttling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from instances import tokens
from tenement_site.asgi import application

pytestmark = [pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def clean_rate_limits() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


# ---- WebSocket origins ---------------------------------------------------------------


def staff_cookie() -> str:
    user = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    client = Client(HTTP_HOST="localhost:8000")
    client.force_login(user)
    client.get("/")
    return "; ".join(f"{c.key}={c.value}" for c in client.cookies.values())


async def handshake(origin: str | None, cookie: str, host: str = "localhost:8000") -> bool:
    headers = [(b"host", host.encode()), (b"cookie", cookie.encode())]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    communicator = WebsocketCommunicator(application, "/ws/overview/", headers=headers)
    connected, _ = await communicator.connect(timeout=10)
    await communicator.disconnect()
    return connected


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "origin",
    [
        "http://alice.notes.localhost:8000",  # a tenant's page: the CSWSH of the issue
        "http://evil.localhost:8000",
        "http://localhost:9000",  # another port is another origin
        "https://localhost:8000",  # and another scheme
        "http://localhost.evil.com:8000",
        "null",
        None,
    ],
)
async def test_control_websocket_refuses_other_origins(origin: str | None) -> None:
    cookie = await sync_to_async(staff_cookie)()
    assert await handshake("http://localhost:8000", cookie)  # the dashboard's own page
    assert not await handshake(origin, cookie)


# ---- bodies before auth ----------------------------------------------------------------


async def control_post(headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
    communicator = HttpCommunicator(
        application, "POST", "/api/services/", body=body, headers=[(b"host", b"localhost")]
    )
    communicator.scope["headers"] += headers
    response = await communicator.get_response(timeout=10)
    await communicator.wait(timeout=10)  # Django closes its body file on the way out
    return response


@pytest.mark.django_db(transaction=True)
async def test_declared_huge_body_is_refused_before_auth_without_reading_it() -> None:
    # 1 GiB declared, nothing sent: answered at once, so nothing was read or spooled.
    response = await control_post([(b"content-length", str(2**30).encode())], b"")
    assert response["status"] == 413
    assert (b"connection", b"close") in response["headers"]
    error = json.loads(response["body"])["error"]
    assert error == {"status": 413, "message": "request body over 1024 KiB"}


@pytest.mark.django_db(transaction=True)
async def test_undeclared_body_is_cut_at_the_limit() -> None:
    communicator = HttpCommunicator(
        application, "POST", "/accounts/login/", headers=[(b"host", b"localhost")]
    )
    await communicator.send_input(
        {"type": "http.request", "body": b"a" * 600_000, "more_body": True}
    )
    await communicator.send_input(
        {"type": "http.request", "body": b"a" * 600_000, "more_body": True}
    )
    response = await communicator.receive_output(timeout=10)
    assert response["status"] == 413
    body = await communicator.receive_output(timeout=10)
    assert body["body"].startswith(b"413 request body over 1024 KiB")
    await communicator.wait()


@pytest.mark.django_db(transaction=True)
async def test_a_body_under_the_limit_reaches_django() -> None:
    response = await control_post([(b"content-type", b"application/json")], b"{}")
    assert response["status"] == 401  # Django read it and asked for a token


# ---- API errors ------------------------------------------------------------------------


def admin_api() -> APIClient:
    api = APIClient()
    minted = tokens.mint("edge-admin", "admin", "")
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {minted.secret}")
    return api


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"a": ' * 50_000 + b"1" + b"}" * 50_000],
)
def test_bad_and_deeply_nested_json_are_400(body: bytes) -> None:
    response = admin_api().post("/api/services/", body, content_type="application/json")
    assert response.status_code == 400, response.content[:200]
    assert response.json()["error"]["status"] == 400
    assert "JSON parse error" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_a_full_database_is_a_503_with_retry_after() -> None:
    api = admin_api()
    with connection.cursor() as cursor:
        # A real SQLITE_FULL: the database may not grow by a single page.
        (pages,) = cursor.execute("PRAGMA page_count").fetchone()
        cursor.execute(f"PRAGMA max_page_count = {pages}")
    try:
        response = api.post(
            "/api/services/",
            {"name": "big", "command": "true", "env": {f"K{i}": "v" * 500 for i in range(200)}},
            format="json",
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA max_page_count = 1073741823")
    assert response.status_code == 503, response.content[:300]
    assert response["Retry-After"] == "5"
    assert response.json()["error"]["message"].startswith("the database is busy")


# ---- login throttling ------------------------------------------------------------------


def login(username: str, password: str, address: str) -> int:
    client = Client(HTTP_HOST="localhost", REMOTE_ADDR=address)
    response = client.post("/accounts/login/", {"username": username, "password": password})
    return response.status_code


@pytest.mark.django_db
def test_login_is_throttled_per_account() -> None:
    get_user_model().objects.create_user("op", password="right", is_staff=True)
    for i in range(4):
        assert login("op", "wrong", f"10.0.0.{i}") == 200  # the form again, with an error
    assert login("op", "wrong", "10.0.0.4") == 429  # the fifth failure locks
    # Locked for every address, the right password included.
    assert login("op", "right", "10.0.1.1") == 429


@pytest.mark.django_db
def test_login_is_throttled_per_address() -> None:
    get_user_model().objects.create_user("op", password="right", is_staff=True)
    for i in range(4):
        assert login(f"guess{i}", "wrong", "10.0.0.9") == 200
    assert login("guess4", "wrong", "10.0.0.9") == 429
    assert login("op", "right", "10.0.0.9") == 429
    assert login("op", "right", "10.0.0.10") == 302  # another address, not locked


# ---- CSRF and cookies ------------------------------------------------------------------


@pytest.mark.django_db
def test_csrf_trusts_only_the_control_hosts_own_origin() -> None:
    get_user_model().objects.create_user("op", password="right", is_staff=True)
    client = Client(HTTP_HOST="localhost:8000", enforce_csrf_checks=True)
    page = client.get("/accounts/login/")
    cookie = client.cookies["csrftoken"]
    assert cookie["domain"] == ""  # host-only: never sent to, or set from, a subdomain
    token = page.context["csrf_token"]
    form = {"username": "op", "password": "right", "csrfmiddlewaretoken": token}
    tenant = client.post("/accounts/login/", form, HTTP_ORIGIN="http://alice.notes.localhost:8000")
    assert tenant.status_code == 403
    own = client.post("/accounts/login/", form, HTTP_ORIGIN="http://localhost:8000")
    assert own.status_code == 302
    assert client.cookies["sessionid"]["domain"] == ""


@pytest.mark.django_db(transaction=True)
def test_a_locked_database_is_a_503_with_retry_after() -> None:
    import threading

    from django.db import connections

    api = admin_api()
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        # Another connection in a write transaction, as the supervisor or a CLI can be.
        with connections["default"].cursor() as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute("UPDATE instances_service SET name = name")
            locked.set()
            release.wait(30)
            cursor.execute("COMMIT")
        connections["default"].close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert locked.wait(10)
        response = api.post("/api/services/", {"name": "x", "command": "true"}, format="json")
    finally:
        release.set()
        holder.join(30)
    assert response.status_code == 503, response.content[:300]
    assert response["Retry-After"] == "5"
    assert response.json()["error"]["status"] == 503
