"""Upstream's project verbs: init, config (show), token-gen, and where the data dir and
the token file are (`{data_dir}/api_token`, upstream's fallback after --token and
TENEMENT_TOKEN).

The data dir is --data-dir, else TENEMENT_DATA_DIR, else the data_dir of the nearest
tenement.toml (the working directory or a parent, as upstream looks), else the server's
default, ./tenement-data.
"""

from __future__ import annotations

import os
import tomllib
from argparse import Namespace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from instances.cli.client import CliError, Exit
from instances.cli.output import print_json
from instances.ids import LABEL_RE, LABEL_RULE

CONFIG_NAME = "tenement.toml"
TOKEN_FILE = "api_token"
DEFAULT_DATA_DIR = "tenement-data"


def find_config(start: Path | None = None) -> Path | None:
    """The nearest tenement.toml in the working directory or a parent (upstream's search)."""
    here = (start or Path.cwd()).resolve()
    for folder in [here, *here.parents]:
        if (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    return None


def read_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"cannot read {path}: {e}", Exit.FAILED) from None


def data_dir(args: Namespace) -> Path:
    explicit = getattr(args, "data_dir", None) or os.environ.get("TENEMENT_DATA_DIR")
    if explicit:
        return Path(explicit)
    config = find_config()
    if config is not None:
        settings = read_config(config).get("settings", {})
        if isinstance(settings, dict) and isinstance(settings.get("data_dir"), str):
            return config.parent / settings["data_dir"]  # relative to the file, as the server
        return config.parent / DEFAULT_DATA_DIR
    return Path(DEFAULT_DATA_DIR)


def token_from_file(args: Namespace) -> str | None:
    """{data_dir}/api_token, as `ten token-gen` writes it; None if there is none."""
    try:
        path = data_dir(args) / TOKEN_FILE
        token = path.read_text().strip()
    except (CliError, FileNotFoundError, NotADirectoryError, PermissionError):
        return None  # an unreadable tenement.toml here is no reason to fail a verb
    return token or None


# ---- init ------------------------------------------------------------------------------

DETECT = (
    ("pyproject.toml", "python3 app.py"),
    ("requirements.txt", "python3 app.py"),
    ("package.json", "npm start"),
    ("go.mod", "go run ."),
    ("Cargo.toml", "cargo run --release"),
)
INIT_TEMPLATE = """\
# Made by `ten init`; every key is in the README's configuration reference.
[service.{name}]
command = "{command}"
health = "/health"
idle_timeout = 300
# The app listens on $SOCKET_PATH (a Unix socket) or on 127.0.0.1:$PORT.

[instances]
{name} = ["default"]
"""


def init(args: Namespace) -> int:
    target = Path.cwd() / CONFIG_NAME
    if target.exists():
        raise CliError(f"{CONFIG_NAME} already exists in this directory", Exit.FAILED)
    name = args.name or Path.cwd().name.lower()
    if not LABEL_RE.fullmatch(name):
        raise CliError(
            f"invalid service name {name!r}: must be {LABEL_RULE}; choose one with --name",
            Exit.USAGE,
        )
    command = args.command or detect_command(Path.cwd())
    if '"' in command or "\\" in command or "\n" in command:
        raise CliError("--command may not contain quotes, backslashes or newlines", Exit.USAGE)
    target.write_text(INIT_TEMPLATE.format(name=name, command=command))
    print(f"Created {CONFIG_NAME}\n\n  Service: {name}\n  Command: {command}\n")
    print("Next steps:")
    print("  1. ten token-gen                          # an admin token in {data_dir}/api_token")
    print("  2. manage.py runsupervisor --config tenement.toml   # start the server")
    print("  3. ten ps                                 # check running instances")
    return Exit.OK


def detect_command(folder: Path) -> str:
    for marker, command in DETECT:
        if (folder / marker).exists():
            if command.startswith("python3") and (folder / "main.py").exists():
                return "python3 main.py"
            return command
    return "./app"


# ---- config (show) ----------------------------------------------------------------------


def show(args: Namespace) -> int:
    path = Path(args.file) if getattr(args, "file", None) else find_config()
    if path is None:
        raise CliError(f"no {CONFIG_NAME} here or in a parent directory", Exit.FAILED)
    raw = read_config(path)
    settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else {}
    services = raw.get("service") if isinstance(raw.get("service"), dict) else {}
    if args.json:
        print_json({"file": str(path), "data_dir": str(data_dir(args)), **raw})
        return Exit.OK
    print(f"Config: {path}")
    print(f"Data dir: {data_dir(args)}")
    print(f"Health interval: {settings.get('health_check_interval', 10)}s")
    print("\nServices:")
    for name, service in services.items():
        service = service if isinstance(service, dict) else {}
        print(f"  [{name}]")
        print(f"    command: {service.get('command', '')}")
        print(f"    isolation: {service.get('isolation', 'namespace')}")
        for key, unit in (("health", ""), ("idle_timeout", "s"), ("listen", ""), ("restart", "")):
            if key in service:
                print(f"    {key}: {service[key]}{unit}")
    return Exit.OK


# ---- token-gen --------------------------------------------------------------------------


def token_gen(args: Namespace) -> int:
    """Mint a token in the server's own database, on the server's host (as upstream's
    token-gen writes its database): admin, saved to {data_dir}/api_token (0600), or
    limited to one tenant (write scope) and printed only."""
    folder = data_dir(args).resolve()
    secret = mint_locally(folder, args.tenant, args.description)
    if args.tenant:
        print(f"Generated tenant token for '{args.tenant}':\n\n  {secret}\n")
        print(f"This token can only access instances and logs of tenant '{args.tenant}'.")
        return Exit.OK
    path = folder / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    print(f"Generated admin API token:\n\n  {secret}\n")
    print(f"Token saved to {path}")
    print(f"Use it in the Authorization header: Bearer {secret}")
    return Exit.OK


def mint_locally(folder: Path, tenant: str | None, description: str | None) -> str:
    if not (folder / "tenement.sqlite3").exists() and not os.environ.get("DATABASE_URL"):
        raise CliError(
            f"no tenement database in {folder}: start the server once with this data dir "
            "(manage.py runsupervisor), or pass --data-dir",
            Exit.FAILED,
        )
    os.environ["TENEMENT_DATA_DIR"] = str(folder)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenement_site.settings")
    import django

    django.setup()
    from instances import tokens

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"token-gen {tenant or 'admin'} {stamp}"
    if description:
        name = f"{name} {description}"[:100]
    scope = "write" if tenant else "admin"
    try:
        return tokens.mint(name, scope, tenant or "", None).secret
    except tokens.TokenError as e:
        raise CliError(str(e), Exit.USAGE) from None
