"""A throwaway PostgreSQL cluster from Debian's packages, for tests of the scaled mode."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else None


def _as_owner(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root; Debian's package creates the `postgres` user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A running throwaway cluster that a test can stop (as a crash would) and start."""

    def __init__(self, pg_ctl: str, data: str, opts: str, log: str, url: str) -> None:
        self.pg_ctl, self.data, self.opts, self.log, self.url = pg_ctl, data, opts, log, url

    def stop_immediately(self) -> None:
        run = {"check": True, "capture_output": True, "timeout": 60}
        subprocess.run(_as_owner([self.pg_ctl, "-D", self.data, "-m", "immediate", "stop"]), **run)

    def start(self) -> None:
        cmd = [self.pg_ctl, "-D", self.data, "-o", self.opts, "-l", self.log, "-w", "start"]
        subprocess.run(_as_owner(cmd), check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """Start a cluster on a free loopback port; yield its base URL; always stop it."""
    with controllable_cluster() as c:
        yield c.url


@contextlib.contextmanager
def controllable_cluster() -> Iterator[Cluster]:
    """cluster(), yielding a Cluster the test may stop and start again."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("PostgreSQL is not installed: run scripts/system-deps.sh test")
    root = tempfile.mkdtemp(prefix="tpg", dir="/tmp")
    if os.getuid() == 0:
        shutil.chown(root, "postgres")
    data, port = os.path.join(root, "data"), _free_port()
    run = {"check": True, "capture_output": True, "timeout": 60}
    subprocess.run(_as_owner([initdb, "-D", data, "-A", "trust", "-U", "postgres"]), **run)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        _as_owner([pg_ctl, "-D", data, "-o", opts, "-l", f"{root}/log", "-w", "start"]), **run
    )
    try:
        yield Cluster(pg_ctl, data, opts, f"{root}/log", f"postgres://postgres@127.0.0.1:{port}")
    finally:
        # check=False: the test may have left it stopped.
        stop = _as_owner([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"])
        subprocess.run(stop, capture_output=True, timeout=60, check=False)
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"
