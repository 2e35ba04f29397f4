"""How a tenant's process is confined: its own uid, namespaces, cgroup limits.

A tenant is untrusted code. The launch command is built here as an argument list:

- `process`: `setpriv` switches to the tenant's own uid (no groups, no capabilities,
  no_new_privs) and execs the app. Files and /proc entries of the supervisor (root) and
  of other tenants are closed to it by ordinary permissions.
- `namespace`: bubblewrap (Debian's `bwrap`, the sandbox Flatpak uses) gives the app new
  mount, PID, IPC and UTS namespaces (and network with `network = "none"`): a private
  /proc and /tmp, the data root replaced by an empty tmpfs with only the tenant's own data
  and socket folders bound back in, the config file masked; then `setpriv` as above.
  Without root, bwrap makes a user namespace instead of switching uid.

We use bwrap rather than raw clone flags because it does the mount set-up (pivot_root,
tmpfs, binds, /proc) declaratively in ~3 ms, is setuid-safe by design, and needs no
shell script between fork and exec.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from instances.spec import ServiceSpec
from instances.supervisor import cgroups

# Signals a sandbox's outer bwrap must not die of: it would take the app down without its
# grace period. The app gets them back at default disposition through `env`.
SHIELDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


class IsolationUnavailable(Exception):
    """The host cannot provide what a service asks for (the message says what is missing)."""


@dataclass(frozen=True)
class Host:
    """What this machine lets the supervisor do, probed once per process."""

    root: bool
    bwrap: str | None
    setpriv: str | None
    env: str | None
    cgroups: cgroups.CgroupHost | None

    def describe(self) -> str:
        parts = ["root" if self.root else f"uid {os.geteuid()} (not root)"]
        parts.append(f"bwrap {'yes' if self.bwrap else 'missing'}")
        parts.append(self.cgroups.describe() if self.cgroups else "no writable cgroups")
        return ", ".join(parts)


@functools.cache
def host() -> Host:
    return Host(
        root=os.geteuid() == 0,
        bwrap=shutil.which("bwrap"),
        setpriv=shutil.which("setpriv"),
        env=shutil.which("env"),
        cgroups=cgroups.probe(),
    )


@dataclass(frozen=True)
class Identity:
    """Who the tenant runs as; uid None means the supervisor's own (not root)."""

    uid: int | None
    gid: int | None
    shared: bool = False  # an explicit `user` shared by every tenant of the service
    per_tenant: bool = False  # a summary for a service: each tenant gets its own uid

    def describe(self) -> str:
        if self.per_tenant:
            return "own uid per tenant"
        if self.uid is None:
            return "supervisor's uid"
        return f"uid {self.uid}" + (" (shared user)" if self.shared else "")


def identity_for(spec: ServiceSpec, uid: int | None, h: Host) -> Identity:
    if not h.root:
        return Identity(None, None)
    if spec.user:
        try:
            entry = pwd.getpwnam(spec.user)
        except KeyError:
            raise IsolationUnavailable(f"user = {spec.user!r}: no such user on this host") from None
        return Identity(entry.pw_uid, entry.pw_gid, shared=True)
    if uid is None:
        raise IsolationUnavailable("no uid allocated for this tenant")
    return Identity(uid, uid)


def allocate_uid(pk: int, uids: range, taken: set[int]) -> int:
    """A stable uid: the instance's row id picks a slot; collisions take the next free one."""
    size = len(uids)
    for step in range(size):
        uid = uids[(pk - 1 + step) % size]
        if uid not in taken:
            return uid
    raise IsolationUnavailable(f"uid_range {uids.start}-{uids.stop - 1} is used up")


def check(spec: ServiceSpec, h: Host) -> None:
    """Refuse, with the missing capability named, what the host cannot enforce."""
    if spec.isolation == "sandbox":
        raise IsolationUnavailable(SANDBOX_UNSUPPORTED)
    if spec.isolation == "namespace":
        if not h.bwrap:
            raise IsolationUnavailable(
                "isolation = namespace needs bubblewrap (`apt-get install bubblewrap`); "
                "or set isolation = process"
            )
        if not h.root and not _userns_available():
            raise IsolationUnavailable(
                "isolation = namespace without root needs unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1); run as root or use process"
            )
    if h.root and spec.isolation == "process" and _readable_by_others(spec.config_file):
        raise IsolationUnavailable(
            f"config file {spec.config_file} is readable by other users, tenants included "
            f"(isolation = process does not hide it): chmod 600 {spec.config_file}"
        )
    if h.root and not h.setpriv:
        raise IsolationUnavailable("running tenants as their own uid needs setpriv (util-linux)")
    if why := cgroups.missing(spec, h.cgroups):
        raise IsolationUnavailable(why)


SANDBOX_UNSUPPORTED = (
    "isolation = sandbox (gVisor) is not supported: Debian's runsc cannot share a Unix "
    "socket the app binds inside the sandbox with the host, so the proxy could never reach "
    'the app; use isolation = namespace (add network = "none" to cut outbound traffic)'
)


def _readable_by_others(path: str) -> bool:
    try:
        return bool(path) and bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


@functools.cache
def _userns_available() -> bool:
    try:
        return Path("/proc/sys/kernel/unprivileged_userns_clone").read_text().strip() != "0"
    except OSError:
        return True  # the knob is Debian's; kernels without it allow user namespaces


def warnings_for(spec: ServiceSpec, h: Host) -> list[str]:
    """What an accepted setting leaves unprotected, said once at start-up."""
    if spec.isolation == "process" and not h.root:
        return [
            f"service {spec.name}: isolation = process without root runs tenants as the "
            "supervisor's own uid: they can read its database, secret key and config and "
            "each other's data; use isolation = namespace, or run as root"
        ]
    return []


def describe(spec: ServiceSpec, ident: Identity, h: Host) -> str:
    """The effective isolation, as shown in logs, `ps`, the API and the dashboard."""
    parts = [spec.isolation, ident.describe()]
    if spec.isolation != "process":
        parts.append(f"network {spec.network}")
    limits = []
    if spec.memory_limit_mb:
        limits.append(f"memory {spec.memory_limit_mb} MiB")
    if spec.cpu_shares:
        limits.append(f"cpu weight {spec.cpu_shares}")
    if spec.cpu_max:
        limits.append(f"cpu max {spec.cpu_max}")
    if spec.pids_max:
        limits.append(f"pids {spec.pids_max}")
    if limits and h.cgroups:
        limits.append(f"cgroup v{h.cgroups.version}")
    return ", ".join(parts + limits)


# ---- the launch command ----------------------------------------------------------------


def launch_argv(
    spec: ServiceSpec,
    instance_id: str,
    argv: list[str],
    cwd: Path,
    ident: Identity,
    h: Host,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The whole argument list: sandbox, then identity switch, then the app."""
    if spec.isolation != "namespace":
        return [*_switch_user(ident, h), *argv]
    assert h.bwrap and h.env
    # The outer bwrap would die of SIGTERM at once and take the app down without its grace
    # period: `env --ignore-signal` shields it (dispositions set in a preexec hook do not
    # survive uvloop's spawn, which resets them), `env --default-signal` undoes it inside.
    shielded = ",".join(s.name.removeprefix("SIG") for s in SHIELDED)
    return [
        h.env,
        f"--ignore-signal={shielded}",
        h.bwrap,
        *bwrap_options(spec, instance_id, cwd, h, code_folders(spec, argv, env or {})),
        "--",
        *_switch_user(ident, h),
        h.env,
        f"--default-signal={shielded}",
        "--unset=PWD",  # bwrap's --chdir sets it; the app's environment stays ours alone
        *argv,
    ]


def _switch_user(ident: Identity, h: Host) -> list[str]:
    if ident.uid is None:
        return []
    assert h.setpriv
    return [
        h.setpriv,
        f"--reuid={ident.uid}",
        f"--regid={ident.gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def bwrap_options(
    spec: ServiceSpec, instance_id: str, cwd: Path, h: Host, code: list[str] | None = None
) -> list[str]:
    data = spec.instance_dir(instance_id)
    opts = ["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    if not h.root:
        opts.append("--unshare-user")
    if spec.network == "none":
        opts.append("--unshare-net")  # only loopback inside; the Unix socket still works
    opts += ["--hostname", instance_id, "--ro-bind", "/", "/", "--dev", "/dev"]
    opts += ["--proc", "/proc", "--tmpfs", "/tmp"]
    # The app's own files that the private /tmp would hide (a checkout under /tmp), read-only;
    # before the tmpfs below, so nothing of the data root can show through them.
    for folder in code or ():
        for between in _folders_between(TMP, folder):
            opts += ["--perms", "0711", "--dir", between]
        opts += ["--ro-bind", folder, folder]
    # The data root (other tenants) and the control plane's state (database, secret key)
    # become empty tmpfs ...
    hidden = _outermost([spec.data_dir, *control_plane_dirs(), *sorted(_masked_dirs)])
    for folder in hidden:
        opts += ["--tmpfs", folder]
    # ... with this tenant's own data and socket folders bound back in. bwrap would make
    # the folders on the way 0700 root, which the tenant's uid could not pass through.
    host_sock, app_sock = spec.socket_path(instance_id), spec.app_socket_path(instance_id)
    binds = [(str(data), str(data)), (os.path.dirname(host_sock), os.path.dirname(app_sock))]
    for _, target in binds:
        for root in hidden:
            for folder in _folders_between(root, target):
                opts += ["--perms", "0711", "--dir", folder]
    for source, target in binds:
        opts += ["--bind", source, target]
    # The config file and the private metrics socket, wherever they are, read as empty.
    for path in [spec.config_file, *sorted(_masked)]:
        if path and os.path.exists(path):
            opts += ["--ro-bind", "/dev/null", path]
    for source, destination, readonly in spec.mounts:
        opts += ["--ro-bind" if readonly else "--bind", source, destination]
    opts += ["--chdir", str(cwd)]
    return opts


def hidden_workdir(spec: ServiceSpec, instance_id: str, cwd: Path) -> str | None:
    """In a namespace the data root and the control plane's folders are empty tmpfs: a
    working directory there (a config file kept in the data dir) would not exist inside.
    The folder that hides it, or None."""
    if spec.isolation != "namespace" or cwd.is_relative_to(spec.instance_dir(instance_id)):
        return None
    for folder in _outermost([spec.data_dir, *control_plane_dirs()]):
        if cwd.is_relative_to(folder):
            return folder
    return None


# Files no tenant may reach even where they are otherwise visible (see mask()).
_masked: set[str] = set()
# Folders every sandbox sees as an empty tmpfs (see mask_dir()).
_masked_dirs: set[str] = set()


def mask(path: str) -> None:
    """Make `path` (e.g. the --metrics-bind socket) read as /dev/null in every sandbox."""
    _masked.add(os.path.abspath(path))


def mask_dir(path: str) -> None:
    """Make the folder `path` (e.g. the ACME cache_dir) an empty tmpfs in every sandbox."""
    _masked_dirs.add(os.path.abspath(path))


@functools.cache
def control_plane_dirs() -> tuple[str, ...]:
    """Folders holding the control plane's state: TENEMENT_DATA_DIR and, for SQLite, the
    database's folder. Hidden from sandboxes even when a service's data_dir is elsewhere."""
    from django.conf import settings

    dirs = [str(settings.TENEMENT_DATA_DIR)]
    db = settings.DATABASES["default"]
    # Only a database file that exists: in-memory names ("file:...?mode=memory") have none.
    if db["ENGINE"].endswith("sqlite3") and os.path.isfile(str(db["NAME"])):
        dirs.append(os.path.dirname(os.path.abspath(db["NAME"])))
    return tuple(dirs)


def _outermost(folders: list[str]) -> list[str]:
    """The folders not inside another of them, shortest first (tmpfs mount order)."""
    out: list[str] = []
    for folder in sorted({os.path.abspath(f) for f in folders}, key=len):
        if not any(Path(folder).is_relative_to(o) for o in out):
            out.append(folder)
    return out


def code_folders(spec: ServiceSpec, argv: list[str], env: Mapping[str, str]) -> list[str]:
    """Folders under /tmp the command names (its arguments, path-like env values, the
    config's folder), which the sandbox's private /tmp would otherwise hide."""
    words = [
        *(p for word in argv for p in _path_words(word)),
        *(p for v in env.values() for p in v.split(os.pathsep)),
        spec.config_dir,
    ]
    private = [Path(d) for d in (spec.data_dir, *control_plane_dirs())]
    found = []
    for word in words:
        if not word.startswith(TMP + "/") or not os.path.exists(word):
            continue
        folder = word if os.path.isdir(word) else os.path.dirname(word)
        # A folder holding the data root must let others pass, or binding it would put its
        # mode (e.g. a 0700 mkdtemp) above the tenant's own folders and lock it out.
        holds_private = any(p.is_relative_to(folder) for p in private)
        if not holds_private or os.stat(folder).st_mode & 0o001:
            found.append(folder)
    return _outermost(found)


TMP = "/tmp"


def _path_words(word: str) -> list[str]:
    """An argument, and the paths in its value when it is NAME=VALUE or --option=VALUE
    (`env PYTHONPATH=/tmp/x/site-packages python3 app.py`, `--app-dir=/tmp/x`)."""
    _, eq, value = word.partition("=")
    return [word, *value.split(os.pathsep)] if eq else [word]


def _folders_between(root: str, target: str) -> list[str]:
    """The folders strictly between root and target, top down ([] if not under root)."""
    path, base = Path(target), Path(root)
    if not path.is_relative_to(base):
        return []
    parts = path.relative_to(base).parts[:-1]
    return [str(base.joinpath(*parts[: i + 1])) for i in range(len(parts))]


def preexec(group: cgroups.InstanceCgroup | None, ident: Identity) -> Callable[[], None] | None:
    """What the child does between fork and exec: join its cgroup and (for a tenant uid)
    take a private umask. Here rather than Popen's umask=: uvloop lacks that."""
    procs = group.procs_files if group else ()
    private = ident.uid is not None
    if not procs and not private:
        return None

    def child() -> None:
        cgroups.enter(procs)
        if private:
            # Sockets and files the app makes are its uid's alone unless it says otherwise.
            os.umask(0o077)

    return child


def exit_code(code: int, spec: ServiceSpec) -> int:
    """bwrap reports an app killed by signal N as 128+N; say it as a signal, as we do
    for unsandboxed apps (-N)."""
    if spec.isolation == "namespace" and 128 < code < 128 + 65:
        return -(code - 128)
    return code


def isolation_report() -> list[str]:
    """One line per service: its effective isolation, or what the host lacks for it."""
    from instances.models import Service
    from instances.spec import ServiceSpec

    h = host()
    lines = [f"Isolation (host: {h.describe()}):"]
    for service in Service.objects.order_by("name"):
        spec = ServiceSpec.from_model(service)
        try:
            check(spec, h)
            per_tenant = h.root and not spec.user
            ident = (
                Identity(None, None, per_tenant=True) if per_tenant else identity_for(spec, None, h)
            )
        except IsolationUnavailable as e:
            lines.append(f"  {spec.name}: CANNOT START: {e}")
            continue
        lines.append(f"  {spec.name}: {describe(spec, ident, h)}")
        lines += [f"  warning: {w}" for w in warnings_for(spec, h)]
    return lines
