"""`ten install` / `ten uninstall`: the systemd unit for this checkout.

install writes deploy/tenement.service with this checkout's paths to the unit folder,
and, only where they are missing, /etc/tenement/tenement.toml (deploy/tenement.toml, all
paths absolute) and an empty /etc/tenement/env (0600, for secrets). Then it reloads
systemd. uninstall stops and disables the service and removes the unit; the config and
the data (/var/lib/tenement) stay.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from instances.cli.client import CliError, Exit

if TYPE_CHECKING:
    from instances.cli.app import Verbs

CHECKOUT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = "/opt/tenement"
UNIT_NAME = "tenement.service"
ENV_FILE = """\
# Environment of the tenement service (systemd EnvironmentFile=): secrets go here,
# e.g. DJANGO_SECRET_KEY=..., DATABASE_URL=postgres://..., TENEMENT_TRUSTED_PROXIES=127.0.0.1
"""


def render_unit(checkout: Path, python: str, domain: str, bind: str, config_dir: Path) -> str:
    text = (checkout / "deploy" / UNIT_NAME).read_text()
    text = text.replace("/etc/tenement/", f"{config_dir}/")
    text = text.replace(f"{TEMPLATE_PATH}/.venv/bin/python", python)
    text = text.replace(TEMPLATE_PATH, str(checkout))
    text = text.replace("TENEMENT_DOMAIN=example.com", f"TENEMENT_DOMAIN={domain}")
    return text.replace("--bind 127.0.0.1:8000", f"--bind {bind}")


def systemd_running() -> bool:
    """Whether systemd is PID 1 here (containers and chroots often have no systemd)."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def systemctl(*args: str) -> None:
    result = subprocess.run(
        ["systemctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise CliError(f"systemctl {' '.join(args)}: {result.stderr.strip()}", Exit.FAILED)


def write_new(path: Path, text: str, mode: int) -> bool:
    """Write `text` unless `path` exists (an operator's own file is never overwritten)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def install(args: argparse.Namespace) -> int:
    checkout = Path(args.checkout).resolve()
    if not (checkout / "deploy" / UNIT_NAME).is_file():
        raise CliError(f"{checkout} is not a tenement checkout (no deploy/{UNIT_NAME})", Exit.USAGE)
    unit_dir, config_dir = Path(args.unit_dir), Path(args.config_dir)
    unit = render_unit(checkout, args.python, args.domain, args.bind, config_dir.resolve())
    try:
        unit_dir.mkdir(parents=True, exist_ok=True)
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        unit_path = unit_dir / UNIT_NAME
        changed = not unit_path.exists() or unit_path.read_text() != unit
        if changed:
            unit_path.write_text(unit)
        config = (checkout / "deploy" / "tenement.toml").read_text()
        config = config.replace(TEMPLATE_PATH, str(checkout))
        wrote_config = write_new(config_dir / "tenement.toml", config, 0o600)
        wrote_env = write_new(config_dir / "env", ENV_FILE, 0o600)
    except OSError as e:
        raise CliError(f"cannot install: {e.strerror}: {e.filename}", Exit.FAILED) from None
    print(f"{'wrote' if changed else 'unchanged'} {unit_path}")
    for name, wrote in (("tenement.toml", wrote_config), ("env", wrote_env)):
        print(f"{'wrote' if wrote else 'kept existing'} {config_dir / name}")
    if args.no_reload or not systemd_running():
        print("systemd not reloaded: run `systemctl daemon-reload` where systemd runs")
    else:
        systemctl("daemon-reload")
        print("systemd reloaded")
    print("next: systemctl enable --now tenement && journalctl -u tenement -f")
    return Exit.OK


def uninstall(args: argparse.Namespace) -> int:
    unit_path = Path(args.unit_dir) / UNIT_NAME
    reload = not args.no_reload and systemd_running()
    if reload and unit_path.exists():
        systemctl("disable", "--now", UNIT_NAME)
    try:
        unit_path.unlink()
    except FileNotFoundError:
        raise CliError(f"{unit_path} is not installed", Exit.NOT_FOUND) from None
    except OSError as e:
        raise CliError(f"cannot remove {unit_path}: {e.strerror}", Exit.FAILED) from None
    print(f"removed {unit_path}")
    if reload:
        systemctl("daemon-reload")
    print(f"kept {args.config_dir} and the data in /var/lib/tenement; delete them to remove all")
    return Exit.OK


def add(verbs: Verbs) -> None:
    parser = verbs.add(
        "install",
        install,
        "Install tenement as a systemd service (Type=notify, hardened).",
        "Writes the unit with this checkout's paths, and /etc/tenement/tenement.toml and\n"
        "/etc/tenement/env where missing; reloads systemd. Run as root.",
    )
    parser.add_argument("--domain", default="localhost", help="TENEMENT_DOMAIN of the service")
    parser.add_argument(
        "--bind", default="127.0.0.1:8000", metavar="HOST:PORT", help="runsupervisor --bind"
    )
    parser.add_argument("--checkout", default=str(CHECKOUT), help="the tenement checkout")
    parser.add_argument(
        "--python", default=sys.executable, help="its virtualenv's python (default: this one)"
    )
    add_paths(parser)
    removal = verbs.add(
        "uninstall",
        uninstall,
        "Stop, disable and remove the systemd service; the config and data stay.",
    )
    add_paths(removal)


def add_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR")
    parser.add_argument("--config-dir", default="/etc/tenement", metavar="DIR")
    parser.add_argument("--no-reload", action="store_true", help="do not call systemctl")
