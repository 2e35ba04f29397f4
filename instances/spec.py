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
        )

    def values(self, instance_id: str, socket: str | None = None) -> dict[str, str]:
        values = {
            "name": self.name,
            "id": instance_id,
            "data_dir": self.data_dir,
            "config_dir": self.config_dir or self.data_dir,
        }
        if socket is not None:
            values["socket"] = socket
        return values

    def socket_path(self, instance_id: str) -> str:
        if self.socket:
            return interpolate(self.socket, self.values(instance_id))
        return default_socket_path(self.data_dir, self.name, instance_id)

    def instance_dir(self, instance_id: str) -> Path:
        return Path(self.data_dir) / self.name / instance_id

    def argv(self, instance_id: str) -> list[str]:
        values = self.values(instance_id, self.socket_path(instance_id))
        # Split before interpolating so a data_dir with spaces stays one argument.
        words = [self.command, *self.args] if self.args else shlex.split(self.command)
        return [interpolate(word, values) for word in words]

    def cwd(self, instance_id: str) -> Path:
        if not self.workdir:
            return self.instance_dir(instance_id)
        workdir = Path(interpolate(self.workdir, self.values(instance_id)))
        return workdir if workdir.is_absolute() else Path(self.config_dir or ".") / workdir

    def environment(self, instance_id: str, parent: dict[str, str] | None = None) -> dict[str, str]:
        """The child's whole environment: never the supervisor's secrets unless inherit_env."""
        parent = dict(os.environ if parent is None else parent)
        socket = self.socket_path(instance_id)
        env = (
            dict(parent)
            if self.inherit_env
            else {k: parent[k] for k in BASE_ENV_VARS if k in parent}
        )
        env.setdefault("LANG", "C.UTF-8")
        # HOME is the tenant's own directory so nothing lands in the operator's home.
        env["HOME"] = env["DATA_DIR"] = str(self.instance_dir(instance_id))
        values = self.values(instance_id, socket)
        # An explicit env entry wins (upstream configs set DATA_DIR themselves) ...
        env.update({k: interpolate(v, values) for k, v in self.env})
        # ... but these identify the instance to itself and are always ours.
        env.update(SOCKET_PATH=socket, INSTANCE_ID=instance_id, SERVICE_NAME=self.name)
        return env


def default_socket_path(data_dir: str, name: str, instance_id: str) -> str:
    """{data_dir}/run/{name}-{id}.sock, shortened by hashing when it would not fit sun_path."""
    path = os.path.join(data_dir, "run", f"{name}-{instance_id}.sock")
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(f"{name}:{instance_id}".encode()).hexdigest()[:20]
    path = os.path.join(data_dir, "run", f"{digest}.sock")
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    # A very deep data_dir: fall back to a per-data-dir folder under the temp dir.
    base = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"tenement-{base}", f"{digest}.sock")
