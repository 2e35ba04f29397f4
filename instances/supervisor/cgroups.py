"""One cgroup per instance: memory, CPU and pids limits, OOM counts, and a clean kill.

cgroup v2 where the supervisor's own cgroup is delegated to it (systemd `Delegate=yes`);
otherwise the v1 controllers that are writable, one hierarchy each (some hosts, and the
machines our tests run on, mount only v1 controllers writable). The instance's process is
put into its cgroup between fork and exec (see `enter`), so nothing it forks escapes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from instances.spec import ServiceSpec

log = logging.getLogger("tenement.cgroups")

CONTROLLERS = ("memory", "cpu", "pids")
# cgroup v1's cpu.shares default is 1024, v2's cpu.weight default is 100.
V1_SHARES_PER_WEIGHT = 1024 / 100
CPU_PERIOD_US = 100_000


class CgroupError(Exception):
    """A limit the host cannot enforce, or a cgroup we could not create."""


@dataclass(frozen=True)
class CgroupHost:
    """Where instance cgroups go: one base folder per controller (v1) or one for all (v2)."""

    version: int
    bases: dict[str, Path]

    @property
    def controllers(self) -> frozenset[str]:
        return frozenset(self.bases)

    def describe(self) -> str:
        ctrls = ",".join(sorted(self.bases))
        return f"cgroup v{self.version} ({ctrls})"


@dataclass
class InstanceCgroup:
    """The folders of one instance's cgroup (one per v1 hierarchy, or one v2 folder)."""

    version: int
    dirs: dict[str, Path]
    procs_files: tuple[str, ...] = field(default=())

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 if unknown)."""
        folder = self.dirs.get("memory")
        if folder is None:
            return 0
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        with contextlib.suppress(OSError):
            for line in (folder / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def pids(self) -> set[int]:
        out: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in Path(path).read_text().split())
        return out

    def kill_all(self) -> None:
        """SIGKILL whatever is left: a tenant may setsid() out of its process group."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 2.0) -> bool:
        """Kill leftovers and delete the folders; rmdir fails (EBUSY) until they are gone."""
        deadline = time.monotonic() + timeout
        while True:
            self.kill_all()
            left = [d for d in set(self.dirs.values()) if not _rmdir(d)]
            if not left:
                return True
            if time.monotonic() >= deadline:
                log.warning("cgroup %s still busy; left in place", left[0])
                return False
            # Killed processes leave the cgroup only once reaped, a moment later.
            time.sleep(0.01)


def _rmdir(folder: Path) -> bool:
    try:
        folder.rmdir()
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def enter(procs_files: tuple[str, ...]) -> None:
    """Called in the child between fork and exec: move itself into its cgroup.

    Only raw os calls: this runs in a forked copy of a threaded process.
    """
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


# ---- finding where we may create cgroups ----------------------------------------------


def base_name_for(data_dir: str | os.PathLike[str]) -> str:
    """One folder per data dir: two supervisors on a host (or a test beside a deployment)
    must never see, reuse or clean up each other's instance cgroups."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(data_dir))).hexdigest()[:12]
    return f"tenement-{digest}"


def probe(base_name: str | None = None) -> CgroupHost | None:
    """The cgroup hierarchy we can write to, preferring a delegated v2 one."""
    if base_name is None:
        from django.conf import settings

        base_name = base_name_for(settings.TENEMENT_DATA_DIR)
    own = _own_cgroups()
    v2 = _probe_v2(own.get(""), base_name)
    if v2 is not None:
        return v2
    return _probe_v1(own, base_name)


def _own_cgroups() -> dict[str, str]:
    """Controller -> our cgroup path, from /proc/self/cgroup ('' is the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            for ctrl in ctrls.split(",") if ctrls else [""]:
                out[ctrl] = path
    return out


def _mounts(fstype: str) -> list[tuple[Path, set[str]]]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] == fstype:
                out.append((Path(parts[1]), set(parts[3].split(","))))
    return out


def _probe_v2(own: str | None, base_name: str) -> CgroupHost | None:
    if own is None:
        return None
    for mount, _ in _mounts("cgroup2"):
        folder = mount / own.lstrip("/")
        try:
            available = set((folder / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        wanted = [c for c in CONTROLLERS if c in available]
        if not wanted or not os.access(folder, os.W_OK):
            continue
        base = _delegate_v2(folder, base_name, wanted)
        if base is not None:
            return CgroupHost(2, dict.fromkeys(wanted, base))
    return None


def _delegate_v2(folder: Path, base_name: str, wanted: list[str]) -> Path | None:
    """Make folder/base_name a cgroup whose children get `wanted` controllers.

    v2 forbids processes in a cgroup that hands controllers down, so the supervisor
    first moves itself into a leaf of its own (folder/supervisor), as systemd expects
    of a service with Delegate=yes.
    """
    enable = " ".join(f"+{c}" for c in wanted)
    try:
        _write(folder / "cgroup.subtree_control", enable)
    except OSError as e:
        if e.errno != errno.EBUSY:
            return None
        leaf = folder / "supervisor"
        try:
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(folder / "cgroup.subtree_control", enable)
        except OSError:
            return None
    base = folder / base_name
    try:
        base.mkdir(exist_ok=True)
        _write(base / "cgroup.subtree_control", enable)
    except OSError:
        return None
    return base


def _probe_v1(own: dict[str, str], base_name: str) -> CgroupHost | None:
    bases: dict[str, Path] = {}
    for mount, options in _mounts("cgroup"):
        for ctrl in CONTROLLERS:
            if ctrl in options and ctrl not in bases and ctrl in own:
                base = mount / own[ctrl].lstrip("/") / base_name
                try:
                    base.mkdir(exist_ok=True)
                except OSError:
                    continue
                if os.access(base, os.W_OK):
                    bases[ctrl] = base
    return CgroupHost(1, bases) if bases else None


def release(host: CgroupHost | None) -> None:
    """At exit: drop our (empty by then) base folders; a busy one is left as it is."""
    for base in set(host.bases.values()) if host else ():
        with contextlib.suppress(OSError):
            base.rmdir()


# ---- one instance ---------------------------------------------------------------------


def required(spec: ServiceSpec) -> set[str]:
    """The controllers a service's limits need."""
    need = set()
    if spec.memory_limit_mb:
        need.add("memory")
    if spec.cpu_shares or spec.cpu_max:
        need.add("cpu")
    if spec.pids_max:
        need.add("pids")
    return need


def missing(spec: ServiceSpec, host: CgroupHost | None) -> str | None:
    """Why the host cannot enforce this service's limits, or None if it can."""
    need = required(spec)
    have = host.controllers if host else frozenset()
    lacking = sorted(need - have)
    if not lacking:
        return None
    keys = {"memory": "memory_limit_mb", "cpu": "cpu_shares/cpu_max", "pids": "pids_max"}
    what = ", ".join(f"{keys[c]} needs the {c} controller" for c in lacking)
    found = host.describe() if host else "no writable cgroup hierarchy"
    return (
        f"{what}, which this host does not delegate to tenement (found: {found}); run as "
        "root or under systemd with Delegate=yes, or remove the limit"
    )


def create(host: CgroupHost, name: str, spec: ServiceSpec) -> InstanceCgroup:
    """A fresh cgroup for one instance with the service's limits written."""
    dirs = {ctrl: base / name for ctrl, base in host.bases.items()}
    for folder in set(dirs.values()):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
    group = InstanceCgroup(host.version, dirs)
    group.procs_files = tuple(str(d / "cgroup.procs") for d in set(dirs.values()))
    # Still populated: leftovers of this instance from a supervisor that died without
    # cleaning up (the data dir lock says no other supervisor owns them). Never two copies.
    if leftovers := group.pids():
        log.warning("%s: killing %d leftover process(es) of a previous run", name, len(leftovers))
        group.kill_all()
    try:
        _apply_limits(group, spec)
    except OSError as e:
        group.remove()
        raise CgroupError(f"cannot set limits in {dirs}: {e.strerror or e}") from None
    return group


def _apply_limits(group: InstanceCgroup, spec: ServiceSpec) -> None:
    if group.version == 2:
        _limits_v2(group.dirs, spec)
    else:
        _limits_v1(group.dirs, spec)


def _limits_v2(dirs: dict[str, Path], spec: ServiceSpec) -> None:
    if spec.memory_limit_mb:
        _write(dirs["memory"] / "memory.max", str(spec.memory_limit_mb * 2**20))
        _write_optional(dirs["memory"] / "memory.swap.max", "0")
    if spec.cpu_shares:
        _write(dirs["cpu"] / "cpu.weight", str(spec.cpu_shares))
    if spec.cpu_max:
        _write(dirs["cpu"] / "cpu.max", f"{cpu_quota_us(spec.cpu_max)} {CPU_PERIOD_US}")
    if spec.pids_max:
        _write(dirs["pids"] / "pids.max", str(spec.pids_max))


def _limits_v1(dirs: dict[str, Path], spec: ServiceSpec) -> None:
    if spec.memory_limit_mb:
        limit = str(spec.memory_limit_mb * 2**20)
        _write(dirs["memory"] / "memory.limit_in_bytes", limit)
        # Memory plus swap, where swap accounting is on: no escaping the limit into swap.
        _write_optional(dirs["memory"] / "memory.memsw.limit_in_bytes", limit)
    if spec.cpu_shares:
        shares = max(2, round(spec.cpu_shares * V1_SHARES_PER_WEIGHT))
        _write(dirs["cpu"] / "cpu.shares", str(shares))
    if spec.cpu_max:
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(cpu_quota_us(spec.cpu_max)))
    if spec.pids_max:
        _write(dirs["pids"] / "pids.max", str(spec.pids_max))


def cpu_quota_us(cpu_max: str) -> int:
    """'50%' -> 50000 µs of CPU per 100000 µs period (half of one CPU)."""
    return max(1000, round(float(cpu_max.rstrip("%")) / 100 * CPU_PERIOD_US))


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _write_optional(path: Path, value: str) -> None:
    # Absent (no swap accounting) or refused (EINVAL on some kernels): nothing to cap.
    with contextlib.suppress(OSError):
        _write(path, value)
