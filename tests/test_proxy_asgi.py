"""The ASGI application in-process: Channels communicators, the real supervisor, real apps.

The proxy and the supervisor share this event loop and talk over the in-memory channel
layer, as they do inside `runsupervisor`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator

from instances.models import Instance, Service
from instances.supervisor import Supervisor
from proxy import state as proxy_state
from tenement_site.asgi import application
from tests.conftest import REPO, TENANT_UVICORN
from tests.test_supervisor import aevents, make_service, register, supervising

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

UVICORN_APP = (
    f"{TENANT_UVICORN} --app-dir {REPO} tests.apps.proxyapp:app --uds {{socket}} "
    "--log-level warning"
)


@pytest.fixture
async def proxy_cleanup() -> AsyncIterator[None]:
    yield
    await proxy_state.close_current()


async def get(host: bytes, path: str = "/", timeout: float = 15) -> dict:
    communicator = HttpCommunicator(application, "GET", path, headers=[(b"host", host)])
    response = await communicator.get_response(timeout=timeout)
    # Django's handler waits for the disconnect before it closes the request body.
    await communicator.send_input({"type": "http.disconnect"})
    await communicator.wait(timeout=5)
    return response


def header(response: dict, name: bytes) -> bytes | None:
    return dict(response["headers"]).get(name)


@pytest.fixture
async def sup(short_tmp: Path, proxy_cleanup: None) -> AsyncIterator[Supervisor]:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as supervisor:
        yield supervisor


async def test_malformed_host_is_400(sup: Supervisor) -> None:
    for host in (b"a..b.localhost", b"x%2e.app.localhost", b"alice.app.localhost:0", b""):
        response = await get(host)
        assert response["status"] == 400, host
        assert response["body"].startswith(b"400 bad request")


async def test_unknown_tenant_is_404_and_starts_nothing(sup: Supervisor, short_tmp: Path) -> None:
    response = await get(b"zed.app.localhost")
    assert response["status"] == 404
    assert response["body"] == b"404 not found: no such tenant: app:zed\n"
    assert not await sync_to_async(Instance.objects.filter(instance_id="zed").exists)()
    assert not (short_tmp / "data" / "app" / "zed").exists()
    assert [rt.state for rt in sup.runtimes.values()] == ["stopped"]


async def test_control_host_goes_to_django(sup: Supervisor) -> None:
    # The dashboard needs a login: "/" redirects to Django's login page.
    response = await get(b"localhost")
    assert response["status"] == 302
    assert dict(response["headers"])[b"Location"] == b"/accounts/login/?next=/"
    login = await get(b"localhost", "/accounts/login/?next=/")
    assert login["status"] == 200
    assert b"tenement" in login["body"].lower()


async def test_a_request_wakes_a_stopped_instance_through_the_channel_layer(
    sup: Supervisor,
) -> None:
    responses = await asyncio.gather(*(get(b"alice.app.localhost", "/health") for _ in range(20)))
    assert [(r["status"], r["body"]) for r in responses] == [(200, b"ok\n")] * 20
    assert all(int(header(r, b"x-tenement-wake")) >= 0 for r in responses)
    assert len(await aevents("app:alice", "starting")) == 1  # 20 requests, one spawn
    again = await get(b"alice.app.localhost", "/count")
    assert header(again, b"x-tenement-wake") is None  # it was running this time


async def test_activity_reaches_the_supervisor_in_batches(sup: Supervisor) -> None:
    rt = sup.runtimes[("app", "alice")]
    await get(b"alice.app.localhost", "/count")  # wakes it
    state = await proxy_state.current()
    sent: list[str] = []
    real_send = state.layer.send

    async def counting_send(channel: str, message: dict) -> None:
        sent.append(message["type"])
        await real_send(channel, message)

    state.layer.send = counting_send  # type: ignore[method-assign]
    try:
        began = time.monotonic()
        before = rt.last_activity
        for _ in range(50):
            await get(b"alice.app.localhost", "/count")
        elapsed = time.monotonic() - began
        async with asyncio.timeout(2):
            while rt.last_activity == before:
                await asyncio.sleep(0.05)
    finally:
        state.layer.send = real_send  # type: ignore[method-assign]
    periods = elapsed / proxy_state.ACTIVITY_INTERVAL
    assert 1 <= sent.count("activity") <= periods + 2, (sent.count("activity"), periods)


@pytest.fixture
async def ws_sup(short_tmp: Path, proxy_cleanup: None) -> AsyncIterator[Supervisor]:
    service = await sync_to_async(Service.objects.create)(
        name="web", command=UVICORN_APP, health="/health", data_dir=str(short_tmp / "data")
    )
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp) as supervisor:
        yield supervisor


async def test_websocket_echo_with_subprotocol_after_a_wake(ws_sup: Supervisor) -> None:
    communicator = WebsocketCommunicator(
        application, "/ws", headers=[(b"host", b"alice.web.localhost")], subprotocols=["v9"]
    )
    connected, subprotocol = await communicator.connect(timeout=15)
    try:
        assert connected and subprotocol == "v9"
        await communicator.send_to(text_data="ping")
        assert await communicator.receive_from(timeout=5) == "ping"
        await communicator.send_to(bytes_data=b"\xff\x00")
        assert await communicator.receive_from(timeout=5) == b"\xff\x00"
        await communicator.send_to(text_data="close:4321")
        closed = await communicator.receive_output(timeout=5)
        assert closed == {"type": "websocket.close", "code": 4321, "reason": "asked"}
    finally:
        await communicator.disconnect()


async def test_websocket_to_an_unknown_tenant_is_refused(ws_sup: Supervisor) -> None:
    communicator = WebsocketCommunicator(
        application, "/ws", headers=[(b"host", b"nobody.web.localhost")]
    )
    connected, code = await communicator.connect(timeout=5)
    assert not connected and code == 1008


async def test_held_requests_are_capped_with_503_and_retry_after(
    short_tmp: Path, proxy_cleanup: None, settings: Any
) -> None:
    settings.TENEMENT_MAX_HELD_REQUESTS = 3
    service = await sync_to_async(make_service)(short_tmp, env={"TESTAPP_START_DELAY": "1"})
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp):
        responses = await asyncio.gather(
            *(get(b"alice.app.localhost", "/health") for _ in range(8))
        )
    statuses = sorted(r["status"] for r in responses)
    assert statuses == [200] * 3 + [503] * 5
    refused = [r for r in responses if r["status"] == 503]
    assert all(header(r, b"retry-after") == b"5" for r in refused)
    assert all(b"too many requests waiting" in r["body"] for r in refused)
