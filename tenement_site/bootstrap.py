"""Things that must happen before Django reads its settings."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# Command-line options that choose where state lives; mapped onto environment variables.
CLI_ENV_OPTIONS = {"--data-dir": "TENEMENT_DATA_DIR", "--domain": "TENEMENT_DOMAIN"}


def apply_cli_overrides(argv: list[str]) -> None:
    """Copy --data-dir/--domain from argv into the environment for settings.py."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name not in CLI_ENV_OPTIONS:
            continue
        if not eq:
            if i + 1 >= len(argv):
                continue  # argparse reports the missing value later, with usage.
            value = argv[i + 1]
        os.environ[CLI_ENV_OPTIONS[name]] = value


def data_dir_from_env() -> Path:
    return Path(os.environ.get("TENEMENT_DATA_DIR") or "./tenement-data").resolve()


def load_or_create_secret_key(data_dir: Path) -> str:
    """Return DJANGO_SECRET_KEY, or a key generated once and kept under data_dir (0600)."""
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    path = data_dir / "secret_key"
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL makes two processes starting together agree on one key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()
