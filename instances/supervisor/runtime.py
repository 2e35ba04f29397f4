"""The supervisor's in-memory view of one instance. Only the supervisor mutates it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from instances.ids import InstanceKey
from instances.models import Instance
from instances.spec import ServiceSpec
from instances.supervisor.backoff import RestartPolicy
from instances.supervisor.cgroups import InstanceCgroup

State = Instance.State
Desired = Instance.Desired

# Stops we asked for; any other exit is a failure and goes through the restart policy.
EXPECTED_STOPS = frozenset({"idle", "manual", "shutdown", "removed", "restart", "release"})


@dataclass
class Runtime:
    pk: int
    key: InstanceKey
    spec: ServiceSpec
    policy: RestartPolicy
    # The spec the current process was started with (socket, health, stop_timeout...).
    proc_spec: ServiceSpec | None = None
    desired: str = Desired.STOPPED
    state: str = State.STOPPED
    always_on: bool = False
    seen_version: datetime | None = None
    proc: asyncio.subprocess.Process | None = None
    cgroup: InstanceCgroup | None = None
    # $PORT of the current process, and where it was found listening once ready (its
    # Unix socket path or tcp:127.0.0.1:PORT): health checks and the proxy go there.
    port: int | None = None
    address: str = ""
    # The tenant's own uid (stored in its row), allocated on its first start as root.
    uid: int | None = None
    # The last storage_quota_mb threshold crossed (0, 80 or 100 percent).
    storage_level: int = 0
    task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    # Why we are stopping it (one of EXPECTED_STOPS), or why we killed it (a failure).
    stopping: str | None = None
    failure: str | None = None
    restart_pending: bool = False
    backoff_until: float = 0.0
    started_at: float = 0.0
    last_activity: float = 0.0
    activity_reported: float = 0.0
    # Open connections per proxy process (by channel name), as the proxies report them.
    proxy_open: dict[str, int] = field(default_factory=dict)
    health_failures: int = 0
    next_health: float = 0.0
    health_ok: bool | None = None
    # Bumped to cancel the wakes in flight (an operator stop, a deregistration), and why.
    wake_epoch: int = 0
    wake_cancelled: str = ""
    # Releases (routing/releases.py): the one its process runs (or last ran), the one it
    # last became healthy on, its pin, and those it failed to start on (name -> version).
    release: str = ""
    last_good: str = ""
    pin: str = ""
    skip: dict[str, str] = field(default_factory=dict)
    weight: int = 100
    # Set while the instance is running and ready.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Replaced on every state change; waiters hold the old one, which gets set.
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    @property
    def upstream(self) -> str:
        return self.address or self.run_spec.socket_path(self.key.instance_id)

    @property
    def run_spec(self) -> ServiceSpec:
        return self.proc_spec or self.spec

    @property
    def has_process(self) -> bool:
        """The lifecycle task is alive: starting, running, or recording an exit."""
        return self.task is not None and not self.task.done()

    @property
    def stop_in_flight(self) -> bool:
        return self.stop_task is not None and not self.stop_task.done()

    @property
    def busy(self) -> bool:
        return self.has_process or self.stop_in_flight

    @property
    def connections(self) -> int:
        return sum(self.proxy_open.values())

    def idle_for(self, now: float) -> float:
        return now - self.last_activity
