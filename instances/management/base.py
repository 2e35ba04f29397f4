"""Shared bits of the operator commands: key parsing, errors without tracebacks, tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor

from instances.ids import InstanceKey, InvalidName, parse_key
from instances.operations import OperationError


def key_arg(value: str) -> InstanceKey:
    """argparse type: SERVICE:ID, refused with the naming rule (a usage error, exit 2)."""
    try:
        return parse_key(value)
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def human_seconds(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


class OperatorCommand(BaseCommand):
    """Turns expected errors into one clear line and a non-zero exit, never a traceback."""

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Applied by manage.py before settings load (see tenement_site.bootstrap).
        parser.add_argument(
            "--data-dir",
            metavar="DIR",
            help="State directory of the supervisor to talk to. Env: TENEMENT_DATA_DIR.",
        )
        return parser

    def execute(self, *args: Any, **options: Any) -> Any:
        try:
            return super().execute(*args, **options)
        except (OperationError, InvalidName) as e:
            raise CommandError(str(e)) from None
        except DatabaseError as e:
            if pending_migrations():
                raise CommandError(
                    f"no tenement database set up in {settings.TENEMENT_DATA_DIR} yet: run "
                    "`manage.py runsupervisor` (or `manage.py migrate`) first"
                ) from None
            raise CommandError(f"database error: {e}") from None


def pending_migrations() -> bool:
    executor = MigrationExecutor(connection)
    return bool(executor.migration_plan(executor.loader.graph.leaf_nodes()))


def ensure_migrated(write: Any) -> None:
    """Apply pending migrations, saying so; silent and quick when there are none."""
    if pending_migrations():
        write("Applying database migrations...")
        call_command("migrate", interactive=False, verbosity=0)
