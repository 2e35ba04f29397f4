"""tenement.toml: parse, validate strictly, and sync into the database.

Compatible with upstream tenement 0.2.x, but where upstream silently ignores a
mistyped key we refuse the file and say which key, where, and what was wrong.
"""

from __future__ import annotations

import difflib
import json
import os
import pwd
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from instances import config_checks
from instances.ids import check_label
from instances.interpolate import PLACEHOLDERS, TemplateError, check_template
from instances.spec import MAX_SOCKET_PATH, ServiceSpec, isolation_fields
from proxy.tls import config as tls_config
from proxy.tls.config import TlsConfig, TlsTable

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
UID_RANGE_RE = re.compile(r"(\d{1,10})-(\d{1,10})")
CPU_MAX_RE = re.compile(r"(?:[1-9]\d{0,4}|0\.\d*[1-9]\d*|[1-9]\d{0,4}\.\d+)%")
DEFAULT_UID_RANGE = "200000-265535"
DEFAULT_PORT_RANGE = "30000-40000"  # upstream's
# Below this are system users, login users and (on most hosts) subordinate-id ranges.
MIN_TENANT_UID = 100_000
HEALTH_PATH_RE = re.compile(r"/[\x21-\x7e]*")

# Built-in defaults for keys that [settings] may override per project.
DEFAULT_IDLE_TIMEOUT = 0.0
DEFAULT_WAKE_TIMEOUT = 30.0
DEFAULT_STARTUP_TIMEOUT = 10.0


class ConfigError(Exception):
    """A config file that cannot be used; .problems lists every reason."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


def _template(allowed: tuple[str, ...]) -> Any:
    def check(value: str) -> str:
        try:
            check_template(value, allowed)
        except TemplateError as e:
            raise ValueError(str(e)) from None
        return value

    return AfterValidator(check)


def _env_name(value: str) -> str:
    if not ENV_NAME_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid environment variable name")
    return value


def _health_path(value: str) -> str:
    if value and not HEALTH_PATH_RE.fullmatch(value):
        raise ValueError("must be an HTTP path starting with '/' with no spaces or control bytes")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


# Bounds keep values inside what the database columns (32-bit ints) and timers can hold.
MAX_INT = 2**31 - 1
MAX_SECONDS = 366 * 86400

ServiceName = Annotated[str, AfterValidator(lambda v: check_label(v, "service name"))]
InstanceId = Annotated[str, AfterValidator(check_label)]


def _instance_entry(value: str) -> str:
    """An [instances] entry: "ID", or "ID@RELEASE" to pin the tenant to a release."""
    instance_id, sep, release = value.partition("@")
    check_label(instance_id)
    if sep:
        check_label(release, "release name")
    return value


InstanceEntry = Annotated[str, AfterValidator(_instance_entry)]
Text = Annotated[str, AfterValidator(_no_nul)]
Template = Annotated[Text, _template(PLACEHOLDERS)]
# A socket or workdir is fixed before the process gets its port.
SOCKET_PLACEHOLDERS = tuple(p for p in PLACEHOLDERS if p not in ("socket", "port"))
SocketTemplate = Annotated[Text, _template(SOCKET_PLACEHOLDERS)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS)]
PositiveSeconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
PositiveInt = Annotated[int, Field(gt=0, le=MAX_INT)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_INT)]


class _Table(BaseModel):
    # inf and nan would make timeouts (and so shutdown) unbounded.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _uid_range(value: str) -> str:
    parse_uid_range(value)
    return value


def _port_range(value: str) -> str:
    parse_port_range(value)
    return value


def parse_port_range(value: str) -> range:
    """'30000-40000' -> range(30000, 40001): unprivileged loopback ports for $PORT."""
    match = UID_RANGE_RE.fullmatch(value.strip())
    if not match or not 1024 <= int(match[1]) <= int(match[2]) <= 65535:
        raise ValueError('must be FIRST-LAST within 1024-65535, e.g. "30000-40000"')
    return range(int(match[1]), int(match[2]) + 1)


def parse_uid_range(value: str) -> range:
    """'200000-265535' -> range(200000, 265536); the range must stay clear of system ids."""
    match = UID_RANGE_RE.fullmatch(value.strip())
    if not match:
        raise ValueError('must be FIRST-LAST, e.g. "200000-265535"')
    first, last = int(match[1]), int(match[2])
    if not MIN_TENANT_UID <= first <= last < 2**32 - 1:
        raise ValueError(
            f"must lie within {MIN_TENANT_UID}-{2**32 - 2} with FIRST <= LAST, clear of "
            "system and login users"
        )
    return range(first, last + 1)


def _cpu_max(value: str) -> str:
    if value and not CPU_MAX_RE.fullmatch(value):
        raise ValueError('must be a percentage of one CPU, e.g. "50%" or "200%"')
    return value


class SettingsTable(_Table):
    data_dir: Text = ""
    uid_range: Annotated[str, AfterValidator(_uid_range)] = DEFAULT_UID_RANGE
    port_range: Annotated[str, AfterValidator(_port_range)] = DEFAULT_PORT_RANGE
    health_check_interval: PositiveSeconds = 10
    max_restarts: NonNegativeInt = 3
    restart_window: PositiveSeconds = 300
    # 0 restarts at once (upstream's tests use it); max_restarts still bounds a crash loop.
    backoff_base_ms: NonNegativeInt = 1000
    backoff_max_ms: PositiveInt = 60_000
    # Project-wide defaults for services that do not set their own.
    idle_timeout: Seconds | None = None
    wake_timeout: PositiveSeconds | None = None
    startup_timeout: PositiveSeconds | None = None
    log_retention_lines: PositiveInt | None = None
    # HTTPS with built-in ACME (proxy/tls/config.py).
    tls: TlsTable = TlsTable()


def _absolute(value: str) -> str:
    if not os.path.isabs(value) or ".." in Path(value).parts:
        raise ValueError("must be an absolute path without '..'")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


class MountTable(_Table):
    """One [[service.NAME.mounts]] entry: a host folder bind-mounted into the sandbox."""

    source: Annotated[Text, AfterValidator(_absolute)]
    destination: Annotated[Text, AfterValidator(_absolute)]
    readonly: bool = True


class ServiceTable(_Table):
    command: Annotated[Template, AfterValidator(_non_empty)]
    args: list[Template] = []
    socket: SocketTemplate = ""
    health: Annotated[str, AfterValidator(_health_path)] = ""
    env: dict[Annotated[str, AfterValidator(_env_name)], Template] = {}
    workdir: SocketTemplate = ""
    inherit_env: bool = False
    idle_timeout: Seconds | None = None
    startup_timeout: PositiveSeconds | None = None
    request_timeout: PositiveSeconds = 30
    wake_timeout: PositiveSeconds | None = None
    stop_timeout: PositiveSeconds = 10
    log_retention_lines: PositiveInt | None = None
    always_on: list[InstanceId] = []
    isolation: Literal["process", "namespace", "sandbox"] = "namespace"
    network: Literal["host", "none"] = "host"
    user: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")] = ""
    mounts: list[MountTable] = []
    memory_limit_mb: Annotated[int, Field(ge=4, le=MAX_INT)] | None = None
    # Upstream's name for cgroup v2 cpu.weight (1-10000, default 100).
    cpu_shares: Annotated[int, Field(ge=1, le=10_000)] | None = None
    cpu_max: Annotated[str, AfterValidator(_cpu_max)] = ""
    pids_max: Annotated[int, Field(ge=1, le=4_194_304)] | None = None
    storage_quota_mb: PositiveInt | None = None
    storage_persist: bool = True
    # Upstream's policy for an exit nobody asked for (README "The supervisor").
    restart: Literal["always", "on-failure", "never"] = "on-failure"
    listen: Literal["auto", "unix", "tcp"] = "auto"


class ConfigTables(_Table):
    settings: SettingsTable = SettingsTable()
    service: dict[ServiceName, ServiceTable] = {}
    instances: dict[str, list[InstanceEntry]] = {}


@dataclass
class LoadedConfig:
    """A validated config with paths resolved and [settings] defaults applied."""

    path: Path
    settings: SettingsTable
    data_dir: Path
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    instances: dict[str, list[str]] = field(default_factory=dict)
    always_on: dict[str, set[str]] = field(default_factory=dict)
    # service -> {instance id: release} from "ID@RELEASE" entries in [instances]
    pins: dict[str, dict[str, str]] = field(default_factory=dict)
    tls: TlsConfig | None = None  # [settings.tls] when enabled

    def instance_ids(self, name: str) -> list[str]:
        """Tenants of a service: [instances] first, then always_on ids not listed there."""
        ids = list(self.instances.get(name, []))
        return ids + sorted(self.always_on.get(name, set()) - set(ids))


def load_config(path: str | os.PathLike[str], default_data_dir: Path) -> LoadedConfig:
    """Read and validate a tenement.toml. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = config_checks.read_toml(path)
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"invalid TOML: {e}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), ["invalid TOML: not UTF-8 text"]) from None
    except ValueError as e:  # huge or nested too deeply
        raise ConfigError(str(path), [str(e)]) from None
    refused = config_checks.refused_keys(raw)
    try:
        tables = ConfigTables.model_validate(raw)
    except ValidationError as e:
        problems = refused + [_describe(err) for err in e.errors()]
        raise ConfigError(str(path), problems) from None
    if refused:
        raise ConfigError(str(path), refused)
    config = _resolve(path.resolve(), tables, default_data_dir)
    problems = _cross_check(config, tables)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def _describe(err: Any) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        model = _model_for(err["loc"][:-1])
        hint = difflib.get_close_matches(key, list(model.model_fields), n=1) if model else []
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{loc}: unknown key{suggestion}"
    return f"{loc}: {_human(err)} (got {_toml_value(err['input'])})"


# pydantic's wording ("Input should be a valid list") in the config's own terms.
_TYPE_WORDS = {
    "string_type": "must be text in quotes",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number, without a fraction",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": 'must be a list, e.g. ["a", "b"]',
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "finite_number": "must be a finite number",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"),
    "greater_than": ("gt", "must be more than {}"),
    "less_than_equal": ("le", "must be at most {}"),
    "less_than": ("lt", "must be less than {}"),
}


def _human(err: Any) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _TYPE_WORDS:
        return _TYPE_WORDS[kind]
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        name, words = _BOUNDS[kind]
        bound = ctx[name]
        return words.format(
            int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        )
    if kind == "literal_error" and "expected" in ctx:
        return f"must be one of {ctx['expected'].replace(chr(39), chr(34))}"
    return str(err["msg"]).removeprefix("Value error, ")


def _toml_value(value: Any) -> str:
    """A value as it was written in TOML: true, "text", 5."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    if not loc:
        return ConfigTables
    if loc[0] == "settings" and len(loc) == 1:
        return SettingsTable
    if loc[:2] == ("settings", "tls") and len(loc) == 2:
        return TlsTable
    if loc[0] == "service" and len(loc) == 2:
        return ServiceTable
    return None


def _resolve(path: Path, tables: ConfigTables, default_data_dir: Path) -> LoadedConfig:
    s = tables.settings
    config_dir = path.parent
    data_dir = Path(s.data_dir) if s.data_dir else default_data_dir
    data_dir = (config_dir / data_dir).resolve() if not data_dir.is_absolute() else data_dir
    config = LoadedConfig(path=path, settings=s, data_dir=data_dir)
    config.tls = tls_config.resolve(s.tls, _control_domain(), data_dir, config_dir)
    for name, svc in tables.service.items():
        fields = svc.model_dump(exclude={"always_on"})
        fields["idle_timeout"] = _first(svc.idle_timeout, s.idle_timeout, DEFAULT_IDLE_TIMEOUT)
        fields["wake_timeout"] = _first(svc.wake_timeout, s.wake_timeout, DEFAULT_WAKE_TIMEOUT)
        fields["startup_timeout"] = _first(
            svc.startup_timeout, s.startup_timeout, DEFAULT_STARTUP_TIMEOUT
        )
        fields["log_retention_lines"] = _first(
            svc.log_retention_lines, s.log_retention_lines, _env_retention()
        )
        fields.update(data_dir=str(data_dir), config_dir=str(config_dir), source=str(path))
        config.services[name] = fields
        config.always_on[name] = set(svc.always_on)
    for name, entries in tables.instances.items():
        ids = [entry.partition("@")[0] for entry in entries]
        config.instances[name] = list(dict.fromkeys(ids))
        config.pins[name] = {
            instance_id: release
            for instance_id, _, release in (entry.partition("@") for entry in entries)
            if release
        }
    return config


def _control_domain() -> str:
    from django.conf import settings

    return settings.TENEMENT_DOMAIN


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _env_retention() -> int:
    from django.conf import settings

    return int(getattr(settings, "TENEMENT_LOG_RETENTION_LINES", 10_000))


def _cross_check(config: LoadedConfig, tables: ConfigTables) -> list[str]:
    problems = []
    if tables.settings.backoff_base_ms > tables.settings.backoff_max_ms:
        problems.append(
            f"settings.backoff_base_ms: {tables.settings.backoff_base_ms} is larger than "
            f"settings.backoff_max_ms ({tables.settings.backoff_max_ms})"
        )
    for name, ids in tables.instances.items():
        if name not in config.services:
            defined = ", ".join(sorted(config.services)) or "none"
            problems.append(
                f"instances.{name}: no [service.{name}] is defined (defined: {defined}) "
                f"(got {ids!r})"
            )
    for name, fields in config.services.items():
        problems += _check_service(name, fields, config.instance_ids(name))
    problems += tls_config.problems(tables.settings.tls, _control_domain())
    return problems + config_checks.settings_problems(config, tables.settings)


SCRIPT_SUFFIXES = frozenset({".py", ".js", ".mjs", ".cjs", ".ts", ".rb", ".php", ".pl", ".jar"})


def _missing_files(argv: list[str], spec: ServiceSpec) -> list[str]:
    """The program, if given by path, and script files named by absolute path, that do not
    exist. A relative program is looked up where it will run (the working directory: the
    config file's folder unless `workdir` says otherwise). Paths under the tenants' data
    dir (made at start) or a mount are not checked, nor any that depend on the tenant."""
    # Inside the sandbox a mount's destination holds its source: not a host path.
    made_later = [spec.data_dir, *(destination for _, destination, _ in spec.mounts)]
    paths = [argv[0]] if argv and "/" in argv[0] else []
    paths += [a for a in argv[1:] if a.startswith("/") and Path(a).suffix in SCRIPT_SUFFIXES]
    # Two tenants' working directories differ only if it names the tenant: then unknown.
    cwd = spec.cwd("x") if spec.cwd("x") == spec.cwd("y") else None
    missing = []
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else (cwd / p if cwd else None)
        if full is None or any(root and str(full).startswith(root) for root in made_later):
            continue
        if not full.exists():
            missing.append(p)
    return missing


def _check_service(name: str, fields: dict[str, Any], ids: list[str]) -> list[str]:
    problems = []
    spec = spec_from_fields(name, fields)
    try:
        argv = spec.argv("x")
    except ValueError as e:
        return [f"service.{name}.command: {e} (got {fields['command']!r})"]
    program = argv[0] if argv else ""
    if not program:
        problems.append(f"service.{name}.command: empty command (got {fields['command']!r})")
    elif "/" not in program and "{" not in fields["command"] and not shutil.which(program):
        problems.append(f"service.{name}.command: {program!r} not found on PATH")
    problems += [
        f"service.{name}.command: {path!r} does not exist (relative paths are looked up in "
        "the config file's folder, or `workdir`; a copied config? use absolute paths)"
        for path in _missing_files(argv, spec)
    ]
    if fields.get("socket"):
        template_problems = _check_socket_template(name, fields["socket"], spec)
        if template_problems:
            return problems + template_problems
    problems += _check_isolation(name, spec)
    for instance_id in ids:
        # Where the app binds, and (in a namespace) the host path the proxy connects to.
        paths = {spec.app_socket_path(instance_id), spec.socket_path(instance_id)}
        sock = max(paths, key=lambda p: len(os.fsencode(p)))
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            problems.append(
                f"service.{name}.socket: {sock!r} for instance {instance_id!r} is longer than "
                f"the {MAX_SOCKET_PATH}-byte Unix socket limit"
            )
    # Paths after interpolation, reserved names and env keys, minimum intervals.
    return problems + config_checks.service_problems(name, fields, spec, ids)


def _check_isolation(name: str, spec: ServiceSpec) -> list[str]:
    """What no host could provide as written; host capabilities are checked at start."""
    from instances.supervisor.isolation import SANDBOX_UNSUPPORTED

    where = f"service.{name}"
    problems = []
    if spec.isolation == "sandbox":
        problems.append(f"{where}.isolation: {SANDBOX_UNSUPPORTED} (got 'sandbox')")
    if spec.listen == "tcp" and spec.network == "none":
        problems.append(
            f"{where}.listen: 'tcp' cannot work with network = 'none': the app's loopback "
            "is private to its sandbox, out of the proxy's reach; use listen = 'unix' "
            "(the socket in $SOCKET_PATH) or network = 'host'"
        )
    if spec.isolation == "process":
        if spec.network != "host":
            problems.append(
                f"{where}.network: network = {spec.network!r} needs isolation = namespace "
                "(a network namespace); got isolation = 'process'"
            )
        if spec.mounts:
            problems.append(
                f"{where}.mounts: mounts need isolation = namespace (a mount namespace); "
                "got isolation = 'process'"
            )
    if spec.user:
        try:
            pwd.getpwnam(spec.user)
        except KeyError:
            problems.append(f"{where}.user: no such user on this host (got {spec.user!r})")
    for source, destination, _ in spec.mounts:
        if not os.path.exists(source):
            problems.append(f"{where}.mounts: source {source!r} does not exist")
        if Path(destination).is_relative_to(spec.data_dir) or destination in ("/", "/proc"):
            problems.append(
                f"{where}.mounts: destination {destination!r} would cover the data root or a "
                "system folder"
            )
    return problems


def _check_socket_template(name: str, template: str, spec: ServiceSpec) -> list[str]:
    where = f"service.{name}.socket"
    if "{id}" not in template:
        return [f"{where}: must contain {{id}} so tenants never share a socket (got {template!r})"]
    if not os.path.isabs(spec.app_socket_path("x")):
        return [
            f"{where}: must be an absolute path, e.g. {{data_dir}}/run/{{name}}-{{id}}.sock "
            f"(got {template!r})"
        ]
    return []


def spec_from_fields(name: str, fields: dict[str, Any]) -> ServiceSpec:
    return ServiceSpec(
        name=name,
        command=fields["command"],
        data_dir=fields["data_dir"],
        args=tuple(fields.get("args") or ()),
        socket=fields.get("socket", ""),
        health=fields.get("health", ""),
        env=tuple(sorted((fields.get("env") or {}).items())),
        workdir=fields.get("workdir", ""),
        config_dir=fields.get("config_dir", ""),
        inherit_env=fields.get("inherit_env", False),
        restart=fields.get("restart", "on-failure"),
        listen=fields.get("listen", "auto"),
        **isolation_fields(fields),
    )


def validate_service(name: str, data: Any, data_dir: Path) -> dict[str, Any]:
    """One [service.NAME] table given as JSON (API), checked with the loader's rules.

    Returns the model fields; raises ConfigError whose problems name `service.NAME.KEY`.
    """
    where = f"service {name!r}"
    raw = {"service": {name: dict(data) if isinstance(data, dict) else data}}
    if refused := config_checks.refused_keys(raw):
        raise ConfigError(where, refused)
    try:
        check_label(name, "service name")
        tables = ConfigTables.model_validate(raw)
    except ValueError as e:
        errors = e.errors() if isinstance(e, ValidationError) else None
        problems = [_describe(err) for err in errors] if errors else [f"service: {e}"]
        raise ConfigError(where, problems) from None
    config = _resolve(data_dir / "api", tables, data_dir)
    fields = config.services[name]
    fields.update(config_dir="", source="api")
    problems = _check_service(name, fields, [])
    if problems:
        raise ConfigError(where, problems)
    return fields


def field_errors(error: ConfigError, name: str) -> dict[str, list[str]]:
    """ConfigError problems as {key: [message]} for an API 400."""
    out: dict[str, list[str]] = {}
    prefix = f"service.{name}."
    for problem in error.problems:
        where, _, message = problem.partition(": ")
        key = where.removeprefix(prefix).split(".")[0] if where.startswith(prefix) else "name"
        out.setdefault(key, []).append(message or problem)
    return out
