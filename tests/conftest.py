from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

TESTAPP = Path(__file__).parent / "apps" / "testapp.py"
REPO = Path(__file__).resolve().parent.parent


def _tenant_python() -> str:
    """An interpreter tenants (their own uids) can run: the system's, not our venv's,
    whose base may live in a private folder (pyenv under /root)."""
    system = "/usr/bin/python3"
    return system if os.access(system, os.X_OK) else sys.executable


TENANT_PYTHON = _tenant_python()
# A tenant app that needs our venv's packages (uvicorn): the system interpreter with
# the venv's site-packages on its path (same Python minor version, same ABI).
TENANT_UVICORN = (
    f"/usr/bin/env PYTHONPATH={sysconfig.get_paths()['purelib']} {TENANT_PYTHON} -m uvicorn"
)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None,
) -> Iterator[None]:
    """A file for the SQLite test database, as in production, not shared-cache memory.

    The supervisor has database threads of its own: in shared-cache memory a write that
    meets another thread's read fails at once ("database table is locked"), where a file
    in WAL mode lets readers and the writer go on, as in a real deployment."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        folder = tempfile.mkdtemp(prefix="tenement-testdb-")
        db.setdefault("TEST", {})["NAME"] = os.path.join(folder, "test.sqlite3")
        yield
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield


# Upstream tenement's `ten` binary (a separate project, never a dependency of ours), for
# the compatibility tests: `make test` installs it into bench/.ten-venv first.
UPSTREAM_TEN = REPO / "bench" / ".ten-venv" / "bin" / "ten"


@pytest.fixture(scope="session")
def upstream_ten() -> Path:
    """Path of upstream's `ten` 0.2.2; fails (never skips) when it is not installed."""
    if not UPSTREAM_TEN.exists():
        pytest.fail(f"{UPSTREAM_TEN} is missing: run `make test` (it installs tenement==0.2.2)")
    return UPSTREAM_TEN


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir: Unix socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tt", dir="/tmp"))
    # Tenants run as their own uids: they must be able to pass through to their folders.
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leftover_children() -> Iterator[None]:
    """Every test must clean up the processes it started."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    leftovers = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and not _descends_from(p, before)
    ]
    alive = [p for p in leftovers if _alive(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    assert not alive, f"test left processes behind: {alive}"


def _descends_from(p: psutil.Process, pids: set[int]) -> bool:
    """Started by a process that outlives the test (a module-scoped supervisor's app)."""
    try:
        return any(parent.pid in pids for parent in p.parents())
    except psutil.Error:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """A new in-memory channel layer per test: its queues belong to one event loop."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()
