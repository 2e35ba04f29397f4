"""config check: a local look at a tenement.toml's structure, key names and value types.

No Django and no database, so it runs on an operator's laptop. It does not expand
placeholders, look commands up on PATH or measure socket paths: the server's
`manage.py loadconfig --check` is the full check.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instances import config_checks
from instances.cli.client import Exit
from instances.cli.output import note, print_json
from instances.ids import LABEL_RE, LABEL_RULE

Check = Callable[[Any], "str | None"]

# The server's bounds (instances/config.py): 32-bit database columns, timers up to a year.
MAX_INT = 2**31 - 1
MAX_SECONDS = 366 * 86400
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _integer(least: int) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be a whole number"
        return None if least <= value <= MAX_INT else f"must be {least} to {MAX_INT}"

    return check


def _seconds(positive: bool) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number of seconds"
        low_ok = value > 0 if positive else value >= 0
        if not math.isfinite(value) or not low_ok or value > MAX_SECONDS:
            return f"must be {'above' if positive else 'at least'} 0 and at most {MAX_SECONDS}"
        return None

    return check


def _strings(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    return None if ok else "must be a list of strings"


def _ids(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of instance ids"
    bad = [v for v in value if not isinstance(v, str) or not _entry_ok(v)]
    return f"invalid instance id {bad[0]!r}: must be {LABEL_RULE}" if bad else None


def _entry_ok(value: str) -> bool:
    """ "ID" or "ID@RELEASE" (a pin), both DNS labels."""
    instance_id, sep, release = value.partition("@")
    return bool(LABEL_RE.fullmatch(instance_id)) and (not sep or bool(LABEL_RE.fullmatch(release)))


def _env(value: Any) -> str | None:
    if not isinstance(value, dict):
        return 'must be a table of NAME = "value"'
    for name, text in value.items():
        if not ENV_NAME_RE.fullmatch(name):
            return f"{name!r} is not a valid environment variable name"
        if not isinstance(text, str):
            return f"{name}: must be a string"
    return None


def _mounts(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        return "must be an array of tables ([[service.NAME.mounts]])"
    for m in value:
        if not isinstance(m.get("source"), str) or not isinstance(m.get("destination"), str):
            return "each mount needs source and destination strings"
        if unknown := sorted(set(m) - {"source", "destination", "readonly"}):
            return f"unknown mount key(s): {', '.join(unknown)}"
    return None


def _table(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a table"


def _one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


TOP = ("settings", "service", "instances")
SETTINGS: dict[str, Check] = {
    "data_dir": _string,
    "health_check_interval": _seconds(positive=True),
    "max_restarts": _integer(0),
    "restart_window": _seconds(positive=True),
    "backoff_base_ms": _integer(0),
    "backoff_max_ms": _integer(1),
    "idle_timeout": _seconds(positive=False),
    "wake_timeout": _seconds(positive=True),
    "startup_timeout": _seconds(positive=True),
    "log_retention_lines": _integer(1),
    "uid_range": _string,
    "port_range": _string,
    "tls": _table,
}
TLS: dict[str, Check] = {
    "enabled": _boolean,
    "acme_email": _string,
    "domain": _string,
    "cache_dir": _string,
    "staging": _boolean,
    "https_port": _integer(1),
    "http_port": _integer(1),
    "dns_provider": _string,
    "directory_url": _string,
    "on_demand": _boolean,
    "wildcard": _boolean,
    "dns_hook": _string,
    "cert_file": _string,
    "key_file": _string,
    "redirect_http": _boolean,
    "orders_per_hour": _integer(1),
    "handshake_wait": _seconds(positive=True),
}
SERVICE: dict[str, Check] = {
    "command": _string,
    "args": _strings,
    "socket": _string,
    "health": _string,
    "env": _env,
    "workdir": _string,
    "inherit_env": _boolean,
    "idle_timeout": _seconds(positive=False),
    "startup_timeout": _seconds(positive=True),
    "request_timeout": _seconds(positive=True),
    "wake_timeout": _seconds(positive=True),
    "stop_timeout": _seconds(positive=True),
    "log_retention_lines": _integer(1),
    "always_on": _ids,
    "isolation": _one_of("process", "namespace", "sandbox"),
    "network": _one_of("host", "none"),
    "user": _string,
    "mounts": _mounts,
    "memory_limit_mb": _integer(4),
    "cpu_shares": _integer(1),
    "cpu_max": _string,
    "pids_max": _integer(1),
    "storage_quota_mb": _integer(1),
    "storage_persist": _boolean,
    "restart": _one_of("always", "on-failure", "never"),
    "listen": _one_of("auto", "unix", "tcp"),
}


def check(args: Namespace) -> int:
    problems = check_file(Path(args.file))
    if args.json:
        print_json({"file": args.file, "ok": not problems, "problems": problems})
    for problem in [] if args.json else problems:
        print(f"{args.file}: {problem}")
    if problems:
        note(f"{len(problems)} problem(s); `manage.py loadconfig --check` is the full check")
        return Exit.FAILED
    if not args.json:
        print(f"{args.file}: ok (structure, key names and types; the server checks the rest)")
    return Exit.OK


def check_file(path: Path) -> list[str]:
    """Every problem found, each as `key: problem`; an empty list for a sound file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        return [f"cannot read: {e.strerror}"]
    except UnicodeDecodeError:
        return ["invalid TOML: not UTF-8 text"]
    except tomllib.TOMLDecodeError as e:
        return [f"invalid TOML: {e}"]
    return check_tables(raw)


def check_tables(raw: dict[str, Any]) -> list[str]:
    # Upstream keys we refuse come with the server's reason (and leave the rest checked).
    problems = config_checks.refused_keys(raw)
    problems += [unknown(key, key, TOP) for key in raw if key not in TOP]
    tables = {key: raw.get(key, {}) for key in TOP}
    for key, value in tables.items():
        if not isinstance(value, dict):
            problems.append(f"{key}: must be a table, [{key}] (got {short(value)})")
            tables[key] = {}
    problems += check_keys(tables["settings"], SETTINGS, "settings")
    problems += check_backoff(tables["settings"])
    if isinstance(tls := tables["settings"].get("tls"), dict):
        problems += check_keys(tls, TLS, "settings.tls")
    for name, service in tables["service"].items():
        problems += check_service(name, service)
    problems += check_instances(tables["instances"], tables["service"])
    return problems


def check_keys(table: dict[str, Any], known: dict[str, Check], where: str) -> list[str]:
    problems = []
    for key, value in table.items():
        check = known.get(key)
        if check is None:
            problems.append(unknown(f"{where}.{key}", key, known))
        elif (problem := check(value)) is not None:
            problems.append(f"{where}.{key}: {problem} (got {short(value)})")
    return problems


def unknown(where: str, key: str, known: Any) -> str:
    hint = difflib.get_close_matches(key, list(known), n=1)
    return f"{where}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")


def check_backoff(settings: dict[str, Any]) -> list[str]:
    base, most = settings.get("backoff_base_ms", 1000), settings.get("backoff_max_ms", 60_000)
    if type(base) is int and type(most) is int and base > most:
        return [f"settings.backoff_base_ms: {base} is larger than settings.backoff_max_ms ({most})"]
    return []


def check_service(name: str, table: Any) -> list[str]:
    where = f"service.{name}"
    problems = []
    if not LABEL_RE.fullmatch(name):
        problems.append(f"{where}: invalid service name {name!r}: must be {LABEL_RULE}")
    if not isinstance(table, dict):
        return [*problems, f"{where}: must be a table, [{where}] (got {short(table)})"]
    command = table.get("command")
    if command is None:
        problems.append(f"{where}.command: missing (the program to run for each tenant)")
    elif isinstance(command, str) and not command.strip():
        problems.append(f"{where}.command: must not be empty")
    return problems + check_keys(table, SERVICE, where)


def check_instances(instances: dict[str, Any], services: dict[str, Any]) -> list[str]:
    problems = []
    for name, ids in instances.items():
        if name not in services:
            defined = ", ".join(sorted(services)) or "none"
            hint = difflib.get_close_matches(name, list(services), n=1)
            guess = f"; did you mean {hint[0]!r}?" if hint else ""
            problems.append(
                f"instances.{name}: no [service.{name}] is defined (defined: {defined}{guess})"
            )
        if (problem := _ids(ids)) is not None:
            problems.append(f"instances.{name}: {problem} (got {short(ids)})")
    return problems


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
