from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from instances import tokens
from instances.management.base import OperatorCommand, ensure_migrated


class Command(OperatorCommand):
    help = (
        "Create an API bearer token. The token is printed once, as the last line; only a "
        "hash of it is stored. Use it as `Authorization: Bearer <token>` or TENEMENT_TOKEN."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--name", required=True, help="A unique name, e.g. ci-deploy.")
        parser.add_argument(
            "--scope",
            choices=["read", "write", "admin"],
            default="read",
            help="read: look; write: also start/stop/register; admin: also services, tokens.",
        )
        parser.add_argument("--tenant", default="", help="Restrict the token to one tenant id.")
        parser.add_argument(
            "--expires", type=float, metavar="DAYS", help="Expire after DAYS (default: never)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ensure_migrated(self.stderr.write)
        try:
            minted = tokens.mint(
                options["name"], options["scope"], options["tenant"], options["expires"]
            )
        except tokens.TokenError as e:
            raise CommandError(str(e)) from None
        t = minted.token
        limits = f", tenant {t.tenant}" if t.tenant else ""
        limits += f", expires {t.expires_at:%Y-%m-%d %H:%M} UTC" if t.expires_at else ""
        self.stderr.write(f"Created token {t.name!r} (scope {t.scope}{limits}). Shown once:")
        self.stdout.write(minted.secret)
