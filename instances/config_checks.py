"""Checks of a config after interpolation: where paths really point, and values that
parse but cannot work. The loader (instances/config.py) and the API run them.

Each problem starts with the key it is about (`service.NAME.KEY` or `settings.KEY`).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instances.spec import MAX_SOCKET_PATH, ServiceSpec

if TYPE_CHECKING:
    from instances.config import LoadedConfig, SettingsTable

# Folders the control plane keeps (or may keep) in the data dir beside the service trees
# ({data_dir}/{service}/{id}): a service of that name would mix tenant data into them.
RESERVED_NAMES = frozenset({"run", "static", "staticfiles", "media", "acme", "certs", "tmp"})
# Set by tenement for every instance. Upstream configs set some of them themselves (its
# examples: DATA_DIR = "{data_dir}/pyapi/{id}", INSTANCE_ID = "{id}"): an entry that names
# the same value is accepted; any other would be ignored or make tenants of two services
# share a directory (DATA_DIR = "{data_dir}/{id}"), so it is refused.
RESERVED_ENV = {
    "SOCKET_PATH": "the socket tenement gives the instance (set `socket` instead)",
    "DATA_DIR": "the tenant's own directory, {data_dir}/{name}/{id}",
    "INSTANCE_ID": "the tenant id",
    "SERVICE_NAME": "the service name",
    "PORT": "the loopback port tenement gives the instance ({port})",
}
VM_REFUSAL = (
    'firecracker and qemu VMs are not supported; use isolation = "namespace" (bubblewrap: '
    "own uid, PID and mount namespaces) with memory_limit_mb, cpu_max and pids_max, and "
    "remove the VM keys"
)
# Upstream 0.2.x keys we do not implement: refused with why and what to use instead.
# (Path in the file -> message.) A key that gains support moves to the loader's models.
# ([settings.tls] moved to the loader's models: built-in ACME, proxy/tls/.)
REFUSED_SETTINGS: dict[str, str] = {}
REFUSED_TOP = {
    "routing": (
        "[routing] is not supported: each tenant is reached at {id}.{service}.{domain}; "
        "custom hosts are `ten domain add HOST SERVICE:ID`; put path rules in a reverse proxy "
        "in front, and remove [routing]"
    ),
}
VM_KEYS = ("kernel", "rootfs", "memory_mb", "vcpus", "vsock_port")
REFUSED_SERVICE = dict.fromkeys(VM_KEYS, VM_REFUSAL)
VM_ISOLATION = ("firecracker", "qemu")
# Never a data dir: the instance folders would be created among the system's own.
_TOP = "bin boot dev etc home lib lib64 proc root run sbin srv sys tmp usr var"
SYSTEM_DIRS = frozenset(["/", *(f"/{d}" for d in _TOP.split())])
# Below these a healthy app fails (a health check's timeout is its interval, up to 5 s)
# or the supervisor spins.
SETTINGS_MINIMUMS = {"health_check_interval": 0.5, "restart_window": 1.0, "backoff_base_ms": 10}
# ... or exactly this: backoff_base_ms = 0 restarts at once (upstream's e2e config).
SETTINGS_ZERO_OK = {"backoff_base_ms"}
SERVICE_MINIMUMS = {
    "startup_timeout": 0.1,
    "request_timeout": 0.1,
    "wake_timeout": 0.1,
    "stop_timeout": 0.1,
    "idle_timeout": 1.0,  # or 0: never stopped for idleness
}
MAX_CONFIG_BYTES = 1024 * 1024
SAMPLE_ID = "x"  # the shortest tenant id: checks that hold for it before any is listed


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file; ValueError with a message for a huge or too deeply nested one."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"file is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        return tomllib.loads(path.read_text())
    except RecursionError:
        raise ValueError("invalid TOML: arrays or tables nested too deeply") from None


def refused_keys(raw: dict[str, Any]) -> list[str]:
    """Upstream keys we refuse, each with the reason; removed from `raw` so the strict
    models report only what is left (typos keep their "unknown key")."""
    problems = []
    for key, why in REFUSED_TOP.items():
        if raw.pop(key, None) is not None:
            problems.append(f"{key}: {why}")
    settings = raw.get("settings")
    if isinstance(settings, dict):
        for key, why in REFUSED_SETTINGS.items():
            if settings.pop(key, None) is not None:
                problems.append(f"settings.{key}: {why}")
    services = raw.get("service")
    for name, table in services.items() if isinstance(services, dict) else ():
        if not isinstance(table, dict):
            continue
        for key, why in REFUSED_SERVICE.items():
            if table.pop(key, None) is not None:
                problems.append(f"service.{name}.{key}: {why}")
        if table.get("isolation") in VM_ISOLATION:
            problems.append(f"service.{name}.isolation: {VM_REFUSAL} (got {table['isolation']!r})")
            table.pop("isolation")
    return problems


def settings_problems(config: LoadedConfig, settings: SettingsTable) -> list[str]:
    problems = []
    if str(config.data_dir) in SYSTEM_DIRS:
        problems.append(
            f"settings.data_dir: {str(config.data_dir)!r} is a system directory; "
            "use a folder of its own, e.g. /var/lib/tenement"
        )
    for key, minimum in SETTINGS_MINIMUMS.items():
        value = getattr(settings, key)
        if value == 0 and key in SETTINGS_ZERO_OK:
            continue
        if value < minimum:
            zero = " or 0 (at once)" if key in SETTINGS_ZERO_OK else ""
            problems.append(f"settings.{key}: must be at least {minimum}{zero} (got {value!r})")
    return problems + distinct_sockets(config)


def service_problems(
    name: str, fields: dict[str, Any], spec: ServiceSpec, ids: list[str]
) -> list[str]:
    problems = []
    if name in RESERVED_NAMES:
        problems.append(
            f"service.{name}: the name {name!r} is reserved for tenement's own folders "
            f"(reserved: {', '.join(sorted(RESERVED_NAMES))})"
        )
    for key in sorted(set(fields.get("env") or {}) & set(RESERVED_ENV)):
        if not _same_as_ours(key, spec):
            problems.append(
                f"service.{name}.env.{key}: set by tenement to {RESERVED_ENV[key]}; remove "
                "it (an entry naming that same value is accepted)"
            )
    problems += minimums(name, fields)
    for instance_id in dict.fromkeys([SAMPLE_ID, *ids]):
        problems += path_problems(name, fields, spec, instance_id)
    return list(dict.fromkeys(problems))  # the same finding for every id once


def _same_as_ours(key: str, spec: ServiceSpec) -> bool:
    """Whether an env entry for a variable we set names our value for every tenant."""
    from instances.interpolate import TemplateError, interpolate

    template = dict(spec.env)[key]
    for instance_id, port in (("a", 30001), ("b-2", 30002)):
        ours = {
            "SOCKET_PATH": spec.app_socket_path(instance_id),
            "DATA_DIR": str(spec.instance_dir(instance_id)),
            "INSTANCE_ID": instance_id,
            "SERVICE_NAME": spec.name,
            "PORT": str(port),
        }[key]
        values = spec.values(instance_id, spec.app_socket_path(instance_id), port)
        try:
            if os.path.normpath(interpolate(template, values)) != ours:
                return False
        except TemplateError:
            return False
    return True


def minimums(name: str, fields: dict[str, Any]) -> list[str]:
    problems = []
    for key, minimum in SERVICE_MINIMUMS.items():
        value = fields.get(key)
        if value is None or (key == "idle_timeout" and value == 0):
            continue
        if value < minimum:
            zero = " or 0 (never)" if key == "idle_timeout" else ""
            problems.append(
                f"service.{name}.{key}: must be at least {minimum}{zero} (got {value!r})"
            )
    return problems


def path_problems(
    name: str, fields: dict[str, Any], spec: ServiceSpec, instance_id: str
) -> list[str]:
    """Where the socket and workdir of one instance resolve, checked as plain paths."""
    problems = []
    data_dir = Path(spec.data_dir)
    own = spec.instance_dir(instance_id)
    if fields.get("socket"):
        sock = spec.socket_path(instance_id)
        where = f"service.{name}.socket"
        # Listed instances are checked by the loader; this catches a template that can
        # never fit, before any tenant is listed.
        longest = max({sock, spec.app_socket_path(instance_id)}, key=lambda p: len(os.fsencode(p)))
        if instance_id == SAMPLE_ID and len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            problems.append(
                f"{where}: {longest!r} is longer than the {MAX_SOCKET_PATH}-byte Unix socket "
                "limit even for a one-letter tenant id"
            )
        # Both where the app binds (its view) and where we connect (in a namespace they
        # differ when the template's folder is shared).
        for path in dict.fromkeys([spec.app_socket_path(instance_id), sock]):
            problems += socket_placement(where, path, data_dir, own)
    if fields.get("workdir"):
        workdir = str(spec.cwd(instance_id))
        problems += workdir_placement(f"service.{name}.workdir", workdir, data_dir, own)
    return problems


def plain(where: str, path: str) -> list[str]:
    if os.path.normpath(path) != path or ".." in Path(path).parts:
        return [f"{where}: resolves to {path!r}: '..' and '.' are not allowed after interpolation"]
    return []


def socket_placement(where: str, sock: str, data_dir: Path, own: Path) -> list[str]:
    """Inside the data dir a socket may not sit among tenement's own files (the top level,
    reserved folders) nor inside another tenant's directory."""
    problems = plain(where, sock)
    path = Path(sock)
    if problems or not path.is_relative_to(data_dir) or path.is_relative_to(own):
        return problems
    parts = path.relative_to(data_dir).parts
    if len(parts) == 1 or parts[0] in RESERVED_NAMES - {"run"}:
        reason = "among tenement's own files"
    elif len(parts) >= 3 and parts[0] != "run":
        reason = "inside another tenant's data directory"
    else:
        return []
    return [f"{where}: resolves to {sock!r}, {reason}; use {{data_dir}}/run/{{name}}-{{id}}.sock"]


def workdir_placement(where: str, workdir: str, data_dir: Path, own: Path) -> list[str]:
    """Inside the data dir a working directory may only be the tenant's own."""
    problems = plain(where, workdir)
    path = Path(workdir)
    if problems or not path.is_relative_to(data_dir) or path.is_relative_to(own):
        return problems
    return [
        f"{where}: resolves to {workdir!r}, inside the data dir but not in the tenant's own "
        "directory ({data_dir}/{name}/{id})"
    ]


def distinct_sockets(config: LoadedConfig) -> list[str]:
    """No two instances, listed or yet to come, may share a socket."""
    from instances.config import spec_from_fields

    seen: dict[str, str] = {}
    problems = []
    for name, fields in config.services.items():
        spec = spec_from_fields(name, fields)
        ids = dict.fromkeys([SAMPLE_ID, *config.instance_ids(name)])
        for instance_id in ids:
            sock = spec.socket_path(instance_id)
            other = seen.setdefault(sock, f"{name}:{instance_id}")
            if other != f"{name}:{instance_id}":
                problems.append(
                    f"service.{name}.socket: {sock!r} for {name}:{instance_id} is also the "
                    f"socket of {other}; include {{name}} and {{id}} in it"
                )
    return problems
