from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from instances import tokens
from instances.management.base import OperatorCommand


class Command(OperatorCommand):
    help = "Revoke an API token by name; it stops working at once."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name", help="The token's name (see the API's /api/tokens/).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            token = tokens.revoke(options["name"])
        except tokens.TokenError as e:
            raise CommandError(str(e)) from None
        self.stdout.write(f"Revoked token {token.name!r}.")
