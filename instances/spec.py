"""ServiceSpec: everything needed to run one tenant of a service, as plain data.

Pure functions only, so the supervisor and tests can use it without a database.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instances.interpolate import interpolate

if TYPE_CHECKING:
    from instances.models import Service

# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Passed through from the supervisor so apps find their runtimes and speak UTF-8.
BASE_ENV_VARS = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    command: str
    data_dir: str
    args: tuple[str, ...] = ()
    socket: str = ""
    health: str = ""
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = ""
    config_dir: str = ""
    inherit_env: bool = False
    idle_timeout: float = 0
    startup_timeout: float = 10
    request_timeout: float = 30
    wake_timeout: float = 30
    stop_timeout: float = 10
    log_retention_lines: int = 10_000
    isolation: str = "process"
    network: str = "host"
    user: str = ""
    # (source, destination, readonly) bind mounts into the namespace.
    mounts: tuple[tuple[str, str, bool], ...] = ()
    memory_limit_mb: int | None = None
    cpu_shares: int | None = None
    cpu_max: str = ""
    pids_max: int | None = None
    storage_quota_mb: int | None = None
    storage_persist: bool = True
    # Upstream's restart policy and where the app is reached (README "TCP apps").
    restart: str = "on-failure"
    listen: str = "auto"
    # The tenement.toml that defined the service: hidden from its tenants.
    config_file: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_model(cls, service: Service) -> ServiceSpec:
        return cls(
            name=service.name,
            command=service.command,
            data_dir=service.data_dir,
            args=tuple(service.args or ()),
            socket=service.socket,
            health=service.health,
            env=tuple(sorted((service.env or {}).items())),
            workdir=service.workdir,
            config_dir=service.config_dir,
            inherit_env=service.inherit_env,
            idle_timeout=service.idle_timeout,
            startup_timeout=service.startup_timeout,
            request_timeout=service.request_timeout,
            wake_timeout=service.wake_timeout,
            stop_timeout=service.stop_timeout,
            log_retention_lines=service.log_retention_lines,
            restart=service.restart,
            listen=service.listen,
            **isolation_fields(service.__dict__),
        )

    def values(
        self, instance_id: str, socket: str | None = None, port: int | None = None
    ) -> dict[str, str]:
        values = {
            "name": self.name,
            "id": instance_id,
            "data_dir": self.data_dir,
            "config_dir": self.config_dir or self.data_dir,
            # Checks interpolate before any port is given out: a stand-in of the same kind.
            "port": str(port if port is not None else 0),
        }
        if socket is not None:
            values["socket"] = socket
        return values

    @property
    def tcp_allowed(self) -> bool:
        """Whether the proxy can reach a TCP port of the app (not from a private network)."""
        return self.listen != "unix" and self.network != "none"

    def app_socket_path(self, instance_id: str) -> str:
        """Where the app binds: $SOCKET_PATH and {socket}, as the app sees its filesystem."""
        if self.socket:
            return interpolate(self.socket, self.values(instance_id))
        return default_socket_path(self.data_dir, self.name, instance_id)

    def socket_path(self, instance_id: str) -> str:
        """Where the supervisor and the proxy connect: the same file, seen from the host.

        A socket folder shared by every tenant (e.g. /tmp/{name}-{id}.sock) would let
        tenants squat or reach each other's sockets; in a namespace the instance gets a
        folder of its own mounted over the shared one, so the host path differs.
        """
        path = self.app_socket_path(instance_id)
        if self.isolation == "process" or self.socket_dir_is_private():
            return path
        return os.path.join(self.private_socket_dir(instance_id), os.path.basename(path))

    def socket_dir_is_private(self) -> bool:
        """Whether each instance's socket lives in a folder of its own (it names the id)."""
        a = os.path.dirname(self.app_socket_path("a"))
        return a != os.path.dirname(self.app_socket_path("b"))

    def private_socket_dir(self, instance_id: str) -> str:
        """The host folder mounted over a shared socket folder inside the namespace."""
        return os.path.dirname(default_socket_path(self.data_dir, self.name, instance_id))

    def instance_dir(self, instance_id: str) -> Path:
        return Path(self.data_dir) / self.name / instance_id

    def argv(self, instance_id: str, port: int | None = None) -> list[str]:
        values = self.values(instance_id, self.app_socket_path(instance_id), port)
        # Split before interpolating so a data_dir with spaces stays one argument.
        words = [self.command, *self.args] if self.args else shlex.split(self.command)
        return [interpolate(word, values) for word in words]

    def cwd(self, instance_id: str) -> Path:
        """`workdir`, else the folder of the config file that defined the service (as
        upstream, whose relative commands run from there), else the tenant's data dir."""
        if not self.workdir:
            return Path(self.config_dir) if self.config_dir else self.instance_dir(instance_id)
        workdir = Path(interpolate(self.workdir, self.values(instance_id)))
        return workdir if workdir.is_absolute() else Path(self.config_dir or ".") / workdir

    def environment(
        self, instance_id: str, parent: dict[str, str] | None = None, port: int | None = None
    ) -> dict[str, str]:
        """The child's whole environment: never the supervisor's secrets unless inherit_env."""
        parent = dict(os.environ if parent is None else parent)
        socket = self.app_socket_path(instance_id)
        env = (
            dict(parent)
            if self.inherit_env
            else {k: parent[k] for k in BASE_ENV_VARS if k in parent}
        )
        env.setdefault("LANG", "C.UTF-8")
        # HOME is the tenant's own directory so nothing lands in the operator's home.
        env["HOME"] = env["DATA_DIR"] = str(self.instance_dir(instance_id))
        values = self.values(instance_id, socket, port)
        # An explicit env entry wins (upstream configs set DATA_DIR themselves; the loader
        # only accepts one naming the tenant's own directory) ...
        env.update({k: interpolate(v, values) for k, v in self.env})
        # ... but these identify the instance to itself and are always ours.
        env.update(SOCKET_PATH=socket, INSTANCE_ID=instance_id, SERVICE_NAME=self.name)
        if port is not None:
            env["PORT"] = str(port)
        return env


def default_socket_path(data_dir: str, name: str, instance_id: str) -> str:
    """{data_dir}/run/{name}-{id}/app.sock, shortened by hashing when it would not fit
    sun_path. The folder is the instance's own, so only its uid (and we) can enter it."""
    path = os.path.join(data_dir, "run", f"{name}-{instance_id}", "app.sock")
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(f"{name}:{instance_id}".encode()).hexdigest()[:20]
    path = os.path.join(data_dir, "run", digest, "app.sock")
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    # A very deep data_dir: fall back to a per-data-dir folder under the temp dir.
    base = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"tenement-{base}", digest, "app.sock")


ISOLATION_FIELDS = (
    "isolation",
    "network",
    "user",
    "memory_limit_mb",
    "cpu_shares",
    "cpu_max",
    "pids_max",
    "storage_quota_mb",
    "storage_persist",
)


def isolation_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The isolation and limit keys of a service (model or config fields) for the spec."""
    out = {k: fields[k] for k in ISOLATION_FIELDS if k in fields and fields[k] is not None}
    out["mounts"] = tuple(
        (m["source"], m["destination"], bool(m.get("readonly", True)))
        for m in fields.get("mounts") or ()
    )
    source = fields.get("source") or ""
    out["config_file"] = source if os.path.isabs(source) else ""
    return out
