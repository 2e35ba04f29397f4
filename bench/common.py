"""Helpers shared by the benchmark scripts in bench/ (not part of the product)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import venv
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
MANAGE = [sys.executable, str(REPO / "manage.py")]
# The system's interpreter (tenants run as their own uids and cannot enter a pyenv under
# /root), else ours; never a venv or pyenv shim: every peer runs the apps with the same one.
PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
PYTHON = os.path.realpath(PYTHON)
TEN_VERSION = "0.2.2"
TEN_VENV = REPO / "bench" / ".ten-venv"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_ten(explicit: str | None) -> str | None:
    """Upstream `ten`: --ten PATH, else $TEN, else bench/.ten-venv/bin/ten."""
    for candidate in (explicit, os.environ.get("TEN"), TEN_VENV / "bin" / "ten"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def ensure_ten(explicit: str | None) -> str:
    """find_ten, installing tenement==0.2.2 into bench/.ten-venv (its own venv) if missing."""
    found = find_ten(explicit)
    if found:
        return found
    log(f"installing upstream tenement=={TEN_VERSION} into {TEN_VENV} (its own venv)")
    venv.create(TEN_VENV, with_pip=True)
    subprocess.run(
        [TEN_VENV / "bin" / "pip", "install", "--quiet", f"tenement=={TEN_VERSION}"],
        check=True,
        timeout=600,
    )
    return str(TEN_VENV / "bin" / "ten")


def register_ours(config: Path, data: Path, running: Iterable[str]) -> Path:
    """Register every tenant of `config`'s [instances]; only `running` will start.

    The config format has no "registered but stopped" entry, so the others are marked
    stopped in the database before any supervisor runs. Returns the database path.
    """
    subprocess.run(
        [*MANAGE, "loadconfig", str(config), "--data-dir", str(data)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    db = data / "tenement.sqlite3"
    keep = list(running)
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.execute(
            "UPDATE instances_instance SET desired_state='stopped' "
            f"WHERE instance_id NOT IN ({','.join('?' * len(keep))})",
            keep,
        )
        conn.commit()
    return db


def running_count(data: Path) -> int:
    """How many of our instances are running (read from the data dir's SQLite database)."""
    with contextlib.closing(sqlite3.connect(data / "tenement.sqlite3", timeout=10)) as db:
        query = "SELECT count(*) FROM instances_instance WHERE state='running'"
        (n,) = db.execute(query).fetchone()
    return n


def become_subreaper() -> None:
    """Adopt orphans: apps whose supervisor died stay our descendants, so we can kill them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def kill_descendants(timeout: float = 5) -> int:
    """SIGTERM every process below this one, SIGKILL those left after `timeout`; reap all."""
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(procs)


@contextlib.contextmanager
def process_group(
    cmd: list[str], *, grace: float = 10, log_file: Path | None = None, **kwargs: object
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` in its own session; on exit SIGTERM its group, then SIGKILL after `grace`."""
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
    )
    try:
        yield proc
    finally:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if log_file:
            out.close()  # type: ignore[union-attr]


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
