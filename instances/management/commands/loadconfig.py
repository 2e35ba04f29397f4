from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import CommandError

from instances.config import ConfigError, LoadedConfig, load_config
from instances.management.base import OperatorCommand, ensure_migrated
from instances.sync import apply_config


class Command(OperatorCommand):
    help = (
        "Validate a tenement.toml and sync it into the database (idempotent). A running "
        "supervisor picks the changes up within a second; running instances keep their old "
        "definition until restarted."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("file", help="Path to tenement.toml")
        parser.add_argument("--check", action="store_true", help="Only validate; change nothing.")

    def execute(self, *args: Any, **options: Any) -> Any:
        if options.get("check"):
            # A check leaves nothing behind, so the data dir need not exist (tenement.E001).
            options["skip_checks"] = True
        return super().execute(*args, **options)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = load_config(options["file"], settings.TENEMENT_DATA_DIR)
        except ConfigError as e:
            raise CommandError(str(e)) from None
        if options["check"]:
            self.report_check(config, options["file"])
            return
        ensure_migrated(self.stderr.write)
        try:
            report = apply_config(config)
        except ConfigError as e:  # e.g. a pin to a release that does not exist
            raise CommandError(str(e)) from None
        for line in report.lines():
            self.stdout.write(line)

    def report_check(self, config: LoadedConfig, path: str) -> None:
        n_instances = sum(len(config.instance_ids(s)) for s in config.services)
        self.stdout.write(f"{path}: OK ({len(config.services)} services, {n_instances} instances)")
