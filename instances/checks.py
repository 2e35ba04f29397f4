"""System checks with stable ids, run by `manage.py check` and before runsupervisor."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register


@register("tenement")
def check_data_dir(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    data_dir = settings.TENEMENT_DATA_DIR
    problems: list[Any] = []
    if not data_dir.is_dir():
        problems.append(
            Error(
                f"TENEMENT_DATA_DIR {data_dir} is not a directory",
                id="tenement.E001",
                hint="Set TENEMENT_DATA_DIR (or --data-dir) to a writable directory.",
            )
        )
    elif not _writable(data_dir):
        problems.append(
            Error(
                f"TENEMENT_DATA_DIR {data_dir} is not writable",
                id="tenement.E002",
                hint="The supervisor keeps its database, secret key and tenant data here.",
            )
        )
    if (data_dir / "secret_key").exists() and (data_dir / "secret_key").stat().st_mode & 0o077:
        problems.append(
            Warning(
                f"{data_dir / 'secret_key'} is readable by other users",
                id="tenement.W001",
                hint="chmod 600 it.",
            )
        )
    return problems


def _writable(path: Any) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)
