#!/usr/bin/env python3
"""Django's command-line utility for tenement."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenement_site.settings")
    from tenement_site import bootstrap

    # --data-dir and --domain decide where the database lives, so they must be
    # applied before Django reads its settings.
    bootstrap.apply_cli_overrides(sys.argv)
    bootstrap.READ_ONLY = bootstrap.is_read_only_command(sys.argv)
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as e:
        # A refused setting (e.g. TENEMENT_METRICS_REQUIRE_TOKEN=0): one line, no traceback.
        sys.exit(f"configuration error: {e}")


if __name__ == "__main__":
    main()
