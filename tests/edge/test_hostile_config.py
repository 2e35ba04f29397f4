"""Hostile configs (also reachable through the admin API): each refused with a message
that names the key, never a traceback, and nothing loaded."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.core.cache import cache
from rest_framework.test import APIClient

from instances import tokens
from instances.config import ConfigError, load_config
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(60)]

A = '[service.a]\ncommand = "python3"\n'
B = '[service.b]\ncommand = "python3"\n'
SHARED = 'socket = "{data_dir}/run/{id}.sock"\n'


def refused(tmp: Path, text: str) -> str:
    path = tmp / "tenement.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, tmp / "data")
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Sockets escaping after interpolation (two tenants on one socket; the database).
        (A + 'socket = "{data_dir}/run/{id}/../shared.sock"\n', "service.a.socket: resolves to"),
        (A + 'socket = "{data_dir}/{id}/../tenement.sqlite3"\n', "'..' and '.' are not allowed"),
        (A + 'socket = "{data_dir}/./run/{id}.sock"\n', "service.a.socket: resolves to"),
        (A + 'socket = "{data_dir}/{id}.sock"\n', "service.a.socket: resolves to"),
        (A + 'socket = "{data_dir}/staticfiles/{id}.sock"\n', "among tenement's own files"),
        (A + 'socket = "{data_dir}/b/{id}/app.sock"\n', "inside another tenant's data directory"),
        # Two services whose tenants of the same id would share one socket (without a
        # namespace, which gives each instance a socket folder of its own).
        (
            A + SHARED + 'isolation = "process"\n' + B + SHARED + 'isolation = "process"\n',
            "service.b.socket: '",
        ),
        # Workdir traversal, and another tenant's directory as working directory.
        (A + 'workdir = "{data_dir}/a/{id}/../../b/bob"\n', "service.a.workdir: resolves to"),
        (A + 'workdir = "{data_dir}/b/bob"\n', "not in the tenant's own directory"),
        (A + 'workdir = "../{id}"\n', "service.a.workdir: resolves to"),
        # Reserved names: the static root, the sockets' folder.
        ('[service.staticfiles]\ncommand = "python3"\n', "service.staticfiles: the name"),
        ('[service.run]\ncommand = "python3"\n', "service.run: the name 'run' is reserved"),
        ('[service.media]\ncommand = "python3"\n', "service.media: the name 'media' is reserved"),
        # Intervals that parse but cannot work.
        ("[settings]\nhealth_check_interval = 1e-9\n", "settings.health_check_interval: must be"),
        ("[settings]\nrestart_window = 0.001\n", "settings.restart_window: must be at least"),
        ("[settings]\nbackoff_base_ms = 1\n", "settings.backoff_base_ms: must be at least 10"),
        (A + "idle_timeout = 0.001\n", "service.a.idle_timeout: must be at least 1.0 or 0"),
        (A + "startup_timeout = 1e-9\n", "service.a.startup_timeout: must be at least"),
        (A + "request_timeout = 1e-9\n", "service.a.request_timeout: must be at least"),
        # A data dir that is the whole machine.
        ('[settings]\ndata_dir = "/"\n', "settings.data_dir: '/' is a system directory"),
        ('[settings]\ndata_dir = "/etc"\n', "settings.data_dir: '/etc' is a system directory"),
        # env entries that tenement sets itself.
        (A + '[service.a.env]\nSOCKET_PATH = "/tmp/x"\n', "service.a.env.SOCKET_PATH: set by"),
        (A + '[service.a.env]\nDATA_DIR = "{data_dir}/{id}"\n', "service.a.env.DATA_DIR: set by"),
        (A + '[service.a.env]\nINSTANCE_ID = "x"\n', "service.a.env.INSTANCE_ID: set by"),
        (A + '[service.a.env]\nSERVICE_NAME = "x"\n', "service.a.env.SERVICE_NAME: set by"),
        # A socket over the 107-byte limit with no instance listed.
        (A + f'socket = "/tmp/{"x" * 100}/{{id}}.sock"\n', "service.a.socket: '/tmp/xxx"),
        # Nested and huge files: a message, not a RecursionError.
        ("a = " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("a = " + "{b = " * 5000 + "1" + "}" * 5000 + "\n", "nested too deeply"),
        ("# " + "x" * 2_000_000 + "\n", "the limit is 1048576"),
    ],
)
def test_hostile_config_is_refused_naming_the_key(tmp_path: Path, text: str, expected: str) -> None:
    message = refused(tmp_path, text)
    assert expected in message
    assert "Traceback" not in message


def test_the_long_socket_message_says_why(tmp_path: Path) -> None:
    message = refused(tmp_path, A + f'socket = "/tmp/{"x" * 100}/{{id}}.sock"\n')
    assert "107-byte Unix socket limit even for a one-letter tenant id" in message


def test_sane_paths_still_load(tmp_path: Path) -> None:
    path = tmp_path / "tenement.toml"
    path.write_text(
        A
        + 'socket = "{data_dir}/run/{name}-{id}.sock"\nworkdir = "{config_dir}"\n'
        + B
        + 'socket = "{data_dir}/b/{id}/app.sock"\nworkdir = "{data_dir}/b/{id}/src"\n'
        + '[instances]\na = ["alice"]\nb = ["bob"]\n'
    )
    config = load_config(path, tmp_path / "data")
    assert set(config.services) == {"a", "b"}


def test_the_static_root_is_outside_every_service_tree() -> None:
    # Service names are DNS labels: none starts with a dot.
    assert Path(settings.STATIC_ROOT).name.startswith(".")


def test_loadconfig_prints_one_line_for_nested_toml(tmp_path: Path) -> None:
    path = tmp_path / "tenement.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "loadconfig", str(path), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "TENEMENT_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.returncode != 0
    assert "nested too deeply" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def admin_api() -> Iterator[APIClient]:
    cache.clear()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {tokens.mint('cfg', 'admin', '').secret}")
    yield api
    cache.clear()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"socket": "{data_dir}/run/{id}/../shared.sock"}, "socket"),
        ({"workdir": "{data_dir}/other/{id}"}, "workdir"),
        ({"env": {"SOCKET_PATH": "/x"}}, "env"),
        ({"idle_timeout": 0.001}, "idle_timeout"),
    ],
)
def test_the_api_refuses_them_too(admin_api: APIClient, body: dict[str, object], key: str) -> None:
    response = admin_api.post(
        "/api/services/", {"name": "notes", "command": "python3", **body}, format="json"
    )
    assert response.status_code == 400, response.content
    assert key in response.json()["error"]["fields"]
    api_staticfiles = admin_api.post(
        "/api/services/", {"name": "staticfiles", "command": "python3"}, format="json"
    )
    assert api_staticfiles.status_code == 400
