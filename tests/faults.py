"""Fault injection for the lifecycle tests: a locked database, a full disk, and a way to
see every tenant process of a deployment (to count orphans and duplicates)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import REPO, TENANT_PYTHON, TESTAPP
from tests.harness import Deployment, free_port, http_request, listening

APP = f"{TENANT_PYTHON} {TESTAPP}"


# Processes of the isolation launch chain around an app (env execs bwrap; setpriv execs it).
SANDBOX_PLUMBING = frozenset({"bwrap", "env", "setpriv"})


class Site(Deployment):
    """A deployment serving HTTP, with helpers to see its tenants from outside."""

    def __init__(self, root: Path, config: str, **env: str) -> None:
        super().__init__(root, config)
        self.port = free_port()
        self.env.update(env)

    def serve(self, *args: str) -> subprocess.Popen[bytes]:
        proc = self.start(
            "--config", str(self.config), "--bind", f"127.0.0.1:{self.port}", *args, http=True
        )
        self.wait_for("the server to listen", lambda: listening(self.port), timeout=60)
        return proc

    def get(self, key: str, path: str = "/health", timeout: float = 30, **kw: object) -> int:
        service, instance_id = key.split(":")
        host = f"{instance_id}.{service}.localhost"
        response, _ = http_request(self.port, host, path, timeout=timeout, **kw)  # type: ignore[arg-type]
        return response.status

    def tenants(self, apps_only: bool = False) -> dict[str, list[int]]:
        """Live tenant processes of this deployment, by instance key (HOME is its data dir).

        With apps_only, the sandbox's own processes are left out (the top is then the app):
        while a killed sandbox is torn down its inner bwrap is briefly an orphan, which
        would otherwise look like a second copy."""
        found: dict[str, list[int]] = {}
        prefix = str(self.data) + os.sep
        for p in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if apps_only and p.name() in SANDBOX_PLUMBING:
                    continue  # a sandbox's wrappers, not a copy of the app
                env = p.environ()
                home = env.get("HOME", "")
                if home.startswith(prefix) and "INSTANCE_ID" in env:
                    service = Path(home).parent.name
                    found.setdefault(f"{service}:{env['INSTANCE_ID']}", []).append(p.pid)
        for pids in found.values():
            self.app_pids.update(pids)
        # One copy is a tree (a sandbox's bwrap, its init, the app): count its top only.
        return {key: [p for p in pids if _parent(p) not in pids] for key, pids in found.items()}

    def stop_within(self, proc: subprocess.Popen[bytes], limit: float) -> float:
        """SIGTERM `proc`; returns how long it took to exit, failing past `limit`."""
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(limit)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"runsupervisor still running {limit:g}s after SIGTERM") from None
        return time.monotonic() - began

    def register(self, *keys: str) -> None:
        """Register tenants, stopped (a request wakes them), as the API would, and wait
        until the proxy routes them: the supervisor syncs every second, then the proxy
        reloads its table (nothing to wait on from outside but the time)."""
        code = "from instances import operations as ops\n" + "".join(
            f"ops.register({k!r}, start=False)\n" for k in keys
        )
        made = subprocess.run(
            [sys.executable, str(REPO / "manage.py"), "shell", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env={**self.env, "TENEMENT_DATA_DIR": str(self.data)},
            cwd=REPO,
        )
        assert made.returncode == 0, made.stderr
        time.sleep(2)

    def assert_legal_transitions(self) -> None:
        """lifecycle.LEGAL is the table of transitions; the supervisor logs any other."""
        assert "illegal_transition" not in self.log()

    def log(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.root.glob("supervisor-*.log")))


@contextlib.contextmanager
def locked_database(site: Deployment) -> Iterator[sqlite3.Connection]:
    """Another process's write lock on the SQLite database (BEGIN EXCLUSIVE): every
    write of the supervisor waits for it, as behind a long transaction or a backup."""
    db = sqlite3.connect(site.data / "tenement.sqlite3", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield db
    finally:
        db.execute("ROLLBACK")
        db.close()


class FullDisk:
    """A small tmpfs mounted as the data dir, which the test can fill up and free."""

    def __init__(self, folder: Path, size_mb: int = 64) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0711", "tmpfs", str(folder)],
            check=True,
            timeout=10,
        )
        self.filler = folder / "filler"

    def fill(self) -> None:
        # An empty WAL first: otherwise SQLite reuses its old pages and never sees ENOSPC.
        with contextlib.closing(
            sqlite3.connect(self.folder / "tenement.sqlite3", timeout=10)
        ) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(self.filler, "wb", buffering=0) as f:
            for size in (1 << 20, 65536, 4096, 512):  # down to the last free block
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * size)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.folder)], check=False, timeout=10)


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def can_mount() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0
