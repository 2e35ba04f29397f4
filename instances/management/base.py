"""Shared bits of the operator commands: key parsing, errors without tracebacks, tables."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor

from instances.ids import InstanceKey, InvalidName, parse_key
from instances.operations import OperationError

SETUP_LOCK_ID = 0x7465_6E65  # "tene": the advisory lock id of first-run set-up


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


def tenement_version() -> str:
    """`--version` of our commands: tenement's version, not Django's."""
    from instances.health import version

    return f"tenement {version()}"


class OperatorCommand(BaseCommand):
    """Turns expected errors into one clear line and a non-zero exit, never a traceback."""

    def get_version(self) -> str:
        return tenement_version()

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
    """Apply pending migrations, saying so; silent and quick when there are none.

    Two commands started together on a fresh data dir (runsupervisor and createtoken)
    would both migrate, and one would crash on "table already exists": the set-up runs
    under a lock, and the second one finds nothing left to do."""
    if not pending_migrations():
        return
    with setup_lock():
        if pending_migrations():  # again: whoever held the lock may have done it
            write("Applying database migrations...")
            call_command("migrate", interactive=False, verbosity=0)


@contextlib.contextmanager
def setup_lock() -> Iterator[None]:
    """An exclusive lock for first-run set-up, held by one process at a time: an advisory
    lock in PostgreSQL (processes may be on several hosts), else a file in the data dir."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [SETUP_LOCK_ID])
            try:
                yield
            finally:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [SETUP_LOCK_ID])
        return
    with open(Path(settings.TENEMENT_DATA_DIR) / "setup.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if we die holding it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
