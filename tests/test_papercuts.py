"""Operator papercuts of issue 16, one test each (in-process where that is enough)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from instances.supervisor import health as probe
from tests.conftest import REPO, TENANT_PYTHON
from tests.harness import Deployment
from tests.test_supervisor import (
    KEY,
    make_service,
    mirrored_row,
    operator_stop,
    register,
    supervising,
)

pytestmark = [pytest.mark.timeout(60)]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


async def test_the_health_probe_reads_the_whole_response(short_tmp: Path) -> None:
    """The app's body goes out after its head; hanging up after the head broke its pipe."""
    body = b"x" * 200_000
    wrote: list[BaseException | None] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(0.1)  # the head arrives alone, as a slow app's would
        try:
            writer.write(body)
            await writer.drain()
            wrote.append(None)
        except OSError as e:
            wrote.append(e)
        finally:
            writer.close()

    path = str(short_tmp / "app.sock")
    server = await asyncio.start_unix_server(answer, path)
    try:
        result = await probe.check(path, "/health", 5)
        await asyncio.sleep(0.05)
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok and result.detail == "HTTP 200"
    assert wrote == [None]


@pytest.mark.django_db(transaction=True)
async def test_health_checked_at_moves_on_every_check_and_stopped_is_not_healthy(
    short_tmp: Path,
) -> None:
    service = await sync_to_async(make_service)(short_tmp)
    await sync_to_async(register)(service, "alice")
    async with supervising(short_tmp, health_check_interval=0.1) as sup:
        await sup.wake(KEY)
        first = (await mirrored_row("alice")).health_checked_at
        await asyncio.sleep(0.5)  # several passing checks
        row = await mirrored_row("alice")
        assert row.health_ok is True and row.health_checked_at > first
        await operator_stop(sup, KEY)
        row = await mirrored_row("alice")
        assert row.state == "stopped" and row.health_ok is None


def manage(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")}
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**clean, **env},
    )


def test_loadconfig_check_creates_nothing_and_catches_unknown_services(tmp_path: Path) -> None:
    config = tmp_path / "tenement.toml"
    config.write_text(f'[service.web]\ncommand = "{TENANT_PYTHON} -V"\n[instances]\nweb = ["a"]\n')
    data = tmp_path / "data"
    ok = manage("loadconfig", "--check", str(config), cwd=tmp_path, TENEMENT_DATA_DIR=str(data))
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tenement.toml"]  # no data dir
    config.write_text(config.read_text() + 'wbe = ["b"]\n')
    bad = manage("loadconfig", "--check", str(config), cwd=tmp_path, TENEMENT_DATA_DIR=str(data))
    assert bad.returncode != 0 and "instances.wbe: no [service.wbe] is defined" in bad.stderr
    assert "Traceback" not in bad.stderr and not data.exists()


def test_a_copied_config_whose_scripts_are_not_there_is_refused(tmp_path: Path) -> None:
    """examples/tenement.toml copied to /etc/tenement: {config_dir}/apps/... is gone."""
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(REPO / "examples" / "tenement.toml", etc)
    out = manage("loadconfig", "--check", str(etc / "tenement.toml"), cwd=tmp_path)
    assert out.returncode != 0
    assert f"'{etc}/apps/counter.py' does not exist" in out.stderr
    assert "Traceback" not in out.stderr
    here = manage("loadconfig", "--check", str(REPO / "examples" / "tenement.toml"), cwd=tmp_path)
    assert here.returncode == 0, here.stderr


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_a_bad_data_dir_is_one_clear_line(short_tmp: Path, kind: str) -> None:
    target = short_tmp / "state"
    if kind == "file":
        target.write_text("not a folder")
        expected = "cannot create it: it is a file"
    else:
        target.mkdir(mode=0o500)
        expected = "not writable by uid"
    # As an unprivileged user: root writes anywhere (and so would pass "unwritable").
    out = subprocess.run(
        [*NOBODY, sys.executable, str(REPO / "manage.py"), "ps", "--data-dir", str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={k: v for k, v in os.environ.items() if not k.startswith("TENEMENT_")},
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"configuration error: data dir {target}") and expected in lines[0]


def test_versions_and_an_unknown_service_in_ps(short_tmp: Path) -> None:
    from instances.health import version

    for command in ("runsupervisor", "ps"):
        out = manage(command, "--version", cwd=short_tmp, TENEMENT_DATA_DIR=str(short_tmp))
        assert out.stdout.strip() == f"tenement {version()}", out.stderr
    assert manage("migrate", cwd=short_tmp, TENEMENT_DATA_DIR=str(short_tmp)).returncode == 0
    out = manage("ps", "nosuch", cwd=short_tmp, TENEMENT_DATA_DIR=str(short_tmp))
    assert out.returncode == 1
    assert out.stderr.strip() == "CommandError: no such service: nosuch (services: none)"


def test_a_port_in_use_stops_start_up_before_anything_is_registered(short_tmp: Path) -> None:
    config = f'[service.web]\ncommand = "{TENANT_PYTHON} -V"\n[instances]\nweb = ["a"]\n'
    d = Deployment(short_tmp, config)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        proc = d.start("--config", str(d.config), "--bind", f"127.0.0.1:{port}", http=True)
        assert proc.wait(60) != 0
        log = (short_tmp / "supervisor-0.log").read_text()
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in log
        assert "Traceback" not in log and "Loaded" not in log
        with pytest.raises(sqlite3.OperationalError):  # not even migrated: nothing registered
            d.rows()
    finally:
        taken.close()
        d.cleanup()


@pytest.mark.django_db
def test_the_api_url_of_a_tenant_keeps_the_port_and_scheme() -> None:
    from rest_framework.test import APIClient

    from instances import tokens
    from instances.models import Instance, Service

    service = Service.objects.create(name="notes", command="x", data_dir="/tmp/x")
    Instance.objects.create(service=service, instance_id="alice")
    api = APIClient(HTTP_HOST="localhost:8123")
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.mint('p', 'read').secret}")
    row = api.get("/api/instances/notes:alice/").json()
    assert row["url"] == "http://alice.notes.localhost:8123/"
    row = api.get("/api/instances/notes:alice/", secure=True, HTTP_HOST="localhost").json()
    assert row["url"] == "https://alice.notes.localhost/"


def test_the_api_schema_has_one_operation_per_log_route_and_no_warnings(short_tmp: Path) -> None:
    out = manage(
        "spectacular", "--validate", "--fail-on-warn", "--format", "openapi-json",
        cwd=short_tmp, TENEMENT_DATA_DIR=str(short_tmp),
    )  # fmt: skip
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr
    schema = json.loads(out.stdout)
    assert [p for p in schema["paths"] if p.startswith("/api/logs")] == [
        "/api/logs/",
        "/api/logs/stream/",
    ]
    # Markdown code: Swagger UI shows it as written, not as an unknown HTML tag.
    assert "`Authorization: Bearer <token>`" in schema["info"]["description"]


@pytest.mark.django_db
def test_both_spellings_of_the_log_routes_still_answer() -> None:
    from rest_framework.test import APIClient

    from instances import tokens

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.mint('l', 'read').secret}")
    assert api.get("/api/logs").status_code == 200
    assert api.get("/api/logs/").status_code == 200


@pytest.mark.django_db
def test_the_admin_shows_events_and_log_lines_read_only() -> None:
    from django.contrib.auth.models import User
    from django.test import Client
    from django.utils import timezone

    from instances.models import Event, Instance, LogLine, Service

    service = Service.objects.create(name="notes", command="x", data_dir="/tmp/x")
    instance = Instance.objects.create(service=service, instance_id="alice")
    event = Event.objects.create(instance=instance, kind="started", message="hello")
    line = LogLine.objects.create(
        instance=instance, stream="stdout", text="a line", time=timezone.now()
    )
    User.objects.create_superuser("boss", "b@x.y", "pw")
    admin = Client()
    admin.force_login(User.objects.get(username="boss"))
    for model, obj in (("event", event), ("logline", line)):
        listing = admin.get(f"/admin/instances/{model}/")
        assert listing.status_code == 200 and f"/admin/instances/{model}/add/" not in listing.text
        assert admin.get(f"/admin/instances/{model}/add/").status_code == 403
        page = admin.get(f"/admin/instances/{model}/{obj.pk}/change/")
        assert page.status_code == 200 and 'name="_save"' not in page.text
        assert admin.post(f"/admin/instances/{model}/{obj.pk}/change/", {}).status_code == 403


@pytest.mark.django_db
def test_the_dashboard_offers_only_actions_that_apply_and_says_sleeping() -> None:
    from django.contrib.auth.models import User
    from django.test import Client

    from instances.models import Instance, Service

    service = Service.objects.create(name="notes", command="x", data_dir="/tmp/x")
    for state in ("stopped", "running", "failed", "starting"):
        Instance.objects.create(service=service, instance_id=state, state=state)
    staff = Client()
    staff.force_login(User.objects.create_user("op", password="pw", is_staff=True))
    page = staff.get("/").text
    offered = {}
    for key, rest in re.findall(r'<tr data-key="notes:(\w+)"(.*?)</tr>', page, re.S):
        offered[key] = re.findall(r'data-action="(\w+)"', rest)
        if key == "stopped":
            assert '<span class="state state-stopped">sleeping</span>' in rest
    assert offered == {
        "failed": ["start", "deregister"],
        "running": ["restart", "stop", "deregister"],
        "starting": ["stop", "deregister"],
        "stopped": ["start", "deregister"],
    }
    assert '<option value="stopped">sleeping</option>' in page
    detail = staff.get("/instances/notes:stopped/").text
    assert '<span id="instance-state" class="state state-stopped">sleeping</span>' in detail
    assert re.findall(r'<button type="submit" data-action="(\w+)"', detail) == [
        "start",
        "deregister",
    ]


def test_config_errors_are_worded_for_people_not_pydantic(tmp_path: Path) -> None:
    from instances.config import ConfigError, load_config

    path = tmp_path / "tenement.toml"
    path.write_text(
        '[service.web]\ncommand = "python3"\nisolation = "vm"\nalways_on = "alice"\n'
        "stop_timeout = true\n[instances]\nweb = 'alice'\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, tmp_path)
    text = str(caught.value)
    assert 'service.web.isolation: must be one of "process", "namespace" or "sandbox"' in text
    assert 'service.web.always_on: must be a list, e.g. ["a", "b"] (got "alice")' in text
    assert "service.web.stop_timeout: must be a number (got true)" in text
    assert "Input should" not in text
