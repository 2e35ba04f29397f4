"""Starting and stopping one app process group, and cleaning up after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from instances.spec import ServiceSpec
from instances.supervisor import cgroups, fds, isolation
from instances.supervisor.isolation import Identity, IsolationUnavailable

log = logging.getLogger("tenement.supervisor")

# Log lines longer than this are split; keeps one chatty app from ballooning memory.
READ_LIMIT = 64 * 1024


class SpawnError(Exception):
    """The process could not be started at all (missing command, bad workdir...)."""


@dataclass
class Launch:
    """A started instance: its process, its cgroup (if any) and how it is confined."""

    proc: asyncio.subprocess.Process
    cgroup: cgroups.InstanceCgroup | None
    isolation: str


def prepare_dirs(spec: ServiceSpec, instance_id: str, ident: Identity | None = None) -> Path:
    """Create the tenant's data dir (0700, its own) and the socket's folder; drop a stale
    socket. With a tenant uid, the folders above are made traversable (0711), not listable."""
    uid = ident.uid if ident else None
    data = spec.instance_dir(instance_id)
    if uid is not None:
        _traversable(Path(spec.data_dir), data)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    socket = Path(spec.socket_path(instance_id))
    if uid is not None and not spec.socket_dir_is_private() and spec.isolation == "process":
        raise SpawnError(
            f"socket folder {socket.parent} is shared by every tenant of {spec.name}: tenants "
            "running as their own uid need a folder each; put {id} in the socket's folder "
            "name, or use isolation = namespace"
        )
    if uid is not None:
        _traversable(Path(spec.data_dir), socket.parent)
    socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if uid is not None and ident is not None:
        _give(data, ident)
        _give(socket.parent, ident)
    _check_owned(socket.parent, os.getuid() if uid is None else uid)
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()
    return data


def _traversable(root: Path, target: Path) -> None:
    """Folders from the data root down to target's parent: 0711 (enter, not list)."""
    if not target.is_relative_to(root):
        return
    folder = root
    for part in target.relative_to(root).parts[:-1]:
        folder.mkdir(parents=True, exist_ok=True, mode=0o711)
        if folder.stat().st_mode & 0o777 != 0o711 and folder.stat().st_uid == os.getuid():
            folder.chmod(0o711)
        folder = folder / part
    folder.mkdir(parents=True, exist_ok=True, mode=0o711)


def _give(folder: Path, ident: Identity) -> None:
    """Hand a tenant its folder; once per new owner, the whole tree (it may hold data
    from before isolation, or from a previous registration under another uid)."""
    st = folder.stat()
    if st.st_uid == ident.uid and st.st_mode & 0o777 == 0o700:
        return
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), ident.uid, ident.gid)  # type: ignore[arg-type]
    os.chown(folder, ident.uid, ident.gid)  # type: ignore[arg-type]
    folder.chmod(0o700)


def _check_owned(folder: Path, owner: int) -> None:
    """Refuse a socket folder someone else controls (e.g. pre-created in /tmp)."""
    st = folder.stat()
    if st.st_uid != owner or st.st_mode & 0o022:
        raise SpawnError(
            f"socket folder {folder} is owned by uid {st.st_uid} or writable by others; "
            "refusing to put the socket there"
        )


def resolve_program(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    program = argv[0]
    if "/" in program:
        path = program if os.path.isabs(program) else str(cwd / program)
        if not os.access(path, os.X_OK):
            raise SpawnError(f"command not found or not executable: {program}")
        return path
    found = shutil.which(program, path=env.get("PATH", os.defpath))
    if not found:
        raise SpawnError(f"command not found on PATH: {program}")
    return found


def use_pidfd_child_watcher() -> None:
    """On 3.11 asyncio waits for each child in a thread of its own; pidfds need none."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return  # 3.12+ already uses pidfds by default
    policy = asyncio.get_event_loop_policy()
    loop = asyncio.get_running_loop()
    watcher = policy.get_child_watcher()
    if not isinstance(watcher, asyncio.PidfdChildWatcher):
        watcher = asyncio.PidfdChildWatcher()
        policy.set_child_watcher(watcher)
    # attach_loop() drops every pending exit callback, so only (re)attach for a new loop.
    if _attached.get("loop") is not loop:
        watcher.attach_loop(loop)
        _attached["loop"] = loop


_attached: dict[str, asyncio.AbstractEventLoop] = {}


async def spawn(
    spec: ServiceSpec, instance_id: str, uid: int | None = None, port: int | None = None
) -> Launch:
    """Start the app confined as its service says, in its own session and cgroup,
    stdout/stderr piped for log capture."""
    use_pidfd_child_watcher()
    h = isolation.host()
    try:
        isolation.check(spec, h)
        ident = isolation.identity_for(spec, uid, h)
    except IsolationUnavailable as e:
        raise SpawnError(str(e)) from None
    prepare_dirs(spec, instance_id, ident)
    env = spec.environment(instance_id, _parent_env(ident), port)
    cwd = spec.cwd(instance_id)
    if not cwd.is_dir():
        raise SpawnError(f"workdir does not exist: {cwd}")
    argv = spec.argv(instance_id, port)
    if names_files_in(argv, cwd):
        check_passable(cwd, ident)
    if (hidden := isolation.hidden_workdir(spec, instance_id, cwd)) is not None:
        raise SpawnError(
            f"the working directory {cwd} is inside {hidden}, which the sandbox hides "
            "(tenement's data); keep the apps and their config elsewhere, or set `workdir`"
        )
    argv[0] = resolve_program(argv, env, cwd)
    group = _cgroup(spec, instance_id, h)
    try:
        proc = await asyncio.create_subprocess_exec(
            *isolation.launch_argv(spec, instance_id, argv, cwd, ident, h, env),
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            limit=READ_LIMIT,
            preexec_fn=isolation.preexec(group, ident),
        )
    except (OSError, subprocess.SubprocessError) as e:
        if group is not None:
            group.remove()
        if fds.exhausted(e):  # ours, not the app's: see handle_failure
            fds.pressure.record("spawn", e)
        raise SpawnError(f"cannot start {argv[0]}: {getattr(e, 'strerror', None) or e}") from None
    return Launch(proc, group, isolation.describe(spec, ident, h))


def _cgroup(
    spec: ServiceSpec, instance_id: str, h: isolation.Host
) -> cgroups.InstanceCgroup | None:
    """Every instance gets a cgroup where the host has one for us: limits, and a way to
    kill what setsid()s out of the process group."""
    if h.cgroups is None:
        return None
    try:
        return cgroups.create(h.cgroups, f"{spec.name}-{instance_id}", spec)
    except (cgroups.CgroupError, OSError) as e:
        if cgroups.required(spec):
            raise SpawnError(str(e)) from None
        log.warning("%s:%s: no cgroup (%s); running without one", spec.name, instance_id, e)
        return None


def cleanup(spec: ServiceSpec, instance_id: str, group: cgroups.InstanceCgroup | None) -> bool:
    """After the process exited: kill what it left, drop its cgroup and socket. Returns
    whether the kernel OOM-killed anything in it (the exit reason is then `oom`)."""
    oom = bool(group and group.oom_kills())
    if group is not None:
        group.remove()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.socket_path(instance_id))
    return oom


def wipe_data(spec: ServiceSpec, instance_id: str) -> None:
    """storage_persist = false: the data dir starts empty on every start, as upstream."""
    data = spec.instance_dir(instance_id)
    if data.is_dir():
        for entry in os.scandir(data):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


# A tenant with its own uid gets the system's PATH: the supervisor's may name folders only
# it can enter (a virtualenv or pyenv under /root), and `python3` in a tenant's command
# should be the system's, not tenement's own interpreter. A service's env may set PATH.
TENANT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _parent_env(ident: Identity) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = TENANT_PATH
    return env


def names_files_in(argv: list[str], cwd: Path) -> bool:
    """Whether the command names files by paths relative to its working directory
    (`./run.sh`, `python3 app.py`, `node server.js`): then the app resolves them."""
    return any(w and not os.path.isabs(w) and (cwd / w).exists() for w in argv)


def check_passable(folder: Path, ident: Identity) -> None:
    """A command that names files in its working directory (by default the config file's
    folder) needs the tenant's uid to pass every folder above it: runtimes resolve such
    paths to absolute ones (Node, Go, Python's sys.path). The chdir itself is done as
    root, so without this the app fails later with a bare EACCES: say where instead."""
    if ident.uid is None:
        return
    for path in [folder, *folder.parents]:
        st = path.stat()
        bit = 0o100 if st.st_uid == ident.uid else 0o001
        if not st.st_mode & bit:
            raise SpawnError(
                f"the working directory {folder} is not reachable by the tenant's uid "
                f"{ident.uid}: {path} is mode {st.st_mode & 0o777:04o} owned by uid "
                f"{st.st_uid}; let others pass (chmod o+x {path}) or set `workdir`"
            )


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group; False if it is already gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


async def terminate(proc: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM the group, wait `grace` seconds, then SIGKILL it. Returns the exit code."""
    pgid = proc.pid
    if proc.returncode is None:
        signal_group(pgid, signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await proc.wait()
        except TimeoutError:
            log.warning(
                "pid %s ignored SIGTERM for %gs; sending SIGKILL",
                pgid,
                grace,
                extra={"event": "sigkill", "pid": pgid},
            )
    # Also reaps helpers the app forked into its group and left behind.
    signal_group(pgid, signal.SIGKILL)
    return await proc.wait()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def is_our_orphan(pid: int, started: float | None) -> bool:
    """True only if pid is still the very process we started (same start time, own group)."""
    if not pid or started is None or start_ticks(pid) != started:
        return False
    try:
        return os.getpgid(pid) == pid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ProcessLookupError):
        return False


async def kill_orphan(pid: int, grace: float) -> None:
    """Stop a group we started before a supervisor crash; we cannot wait() on it, so poll."""
    signal_group(pid, signal.SIGTERM)
    deadline = asyncio.get_running_loop().time() + grace
    while _group_alive(pid) and asyncio.get_running_loop().time() < deadline:
        # No child-exit event exists for a process that is not our child.
        await asyncio.sleep(0.05)
    signal_group(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    # The leader may linger as a zombie if nothing reaps orphans here; that counts as gone.
    try:
        return psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_ticks(pid: int) -> float | None:
    """A process's start time in clock ticks since boot (field 22 of /proc/PID/stat).

    psutil's create_time() adds the wall-clock boot time, which moves when the clock is
    stepped; this does not, so a clock change cannot make us miss (or mistake) a process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return float(fields[19])
