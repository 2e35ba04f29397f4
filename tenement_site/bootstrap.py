"""Things that must happen before Django reads its settings."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path

# Command-line options that choose where state lives; mapped onto environment variables.
CLI_ENV_OPTIONS = {"--data-dir": "TENEMENT_DATA_DIR", "--domain": "TENEMENT_DOMAIN"}
# Set before settings load for commands that must leave no trace on disk (`loadconfig
# --check`): no data dir, secret key or database file is created.
READ_ONLY = False


def is_read_only_command(argv: list[str]) -> bool:
    return len(argv) > 1 and argv[1] == "loadconfig" and "--check" in argv[2:]


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


def ensure_data_dir(data_dir: Path) -> None:
    """Create the state directory private to us: it holds the database and secrets.

    A path that cannot be made or written is one line naming it, never a traceback (the
    caller turns ImproperlyConfigured into `configuration error: ...`)."""
    from django.core.exceptions import ImproperlyConfigured

    if READ_ONLY:
        return
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        reason = "it is a file" if isinstance(e, FileExistsError) else e.strerror
        raise ImproperlyConfigured(
            f"data dir {data_dir} (TENEMENT_DATA_DIR or --data-dir): cannot create it: {reason}"
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ImproperlyConfigured(
            f"data dir {data_dir} (TENEMENT_DATA_DIR or --data-dir): not writable by uid "
            f"{os.getuid()}"
        )


def ensure_private_file(path: Path) -> None:
    """Create an empty file 0600 if missing, so SQLite (and its -wal/-shm) start private."""
    if READ_ONLY:
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def load_or_create_secret_key(data_dir: Path) -> str:
    """Return DJANGO_SECRET_KEY, or a key generated once and kept under data_dir (0600)."""
    if key := os.environ.get("DJANGO_SECRET_KEY"):
        return key
    path = data_dir / "secret_key"
    if READ_ONLY and not path.exists():
        return secrets.token_urlsafe(50)  # nothing is signed by a command that writes nothing
    ensure_data_dir(data_dir)
    if not path.exists():
        # Write aside, then link into place: link fails if another process won the race,
        # and nobody ever reads a half-written key.
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".secret_key.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_text().strip()
