from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from instances import systemd
from instances.config import ConfigError, LoadedConfig, load_config
from instances.management.base import ensure_migrated, tenement_version
from instances.supervisor import Supervisor
from instances.supervisor.cgroups import release as release_cgroups
from instances.supervisor.isolation import host, isolation_report, mask, mask_dir
from instances.supervisor.lock import DataDirBusy, data_dir_lock
from instances.supervisor.sampling import sample_loop
from instances.sync import apply_config, start_config_instances
from proxy.server import bind_private_socket, bind_socket, event_loop_factory, http_task
from proxy.tls import service as tls_service
from proxy.tls.config import TlsConfig

EXIT_GRACE = 1.0  # seconds the interpreter gets to exit once every instance is stopped


class Command(BaseCommand):
    help = (
        "Run tenement: the supervisor (spawn, health-check, restart, idle-stop every instance) "
        "and the HTTP server, in one process. Stops every instance on SIGTERM/SIGINT."
    )

    def get_version(self) -> str:
        return tenement_version()

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=os.environ.get("TENEMENT_CONFIG") or None,
            help="tenement.toml to load (synced into the database) and whose [instances] "
            "are started. Env: TENEMENT_CONFIG.",
        )
        parser.add_argument(
            "--bind",
            metavar="HOST:PORT",
            default=os.environ.get("TENEMENT_BIND") or None,
            help="Address for HTTP (default 127.0.0.1:8000; 0.0.0.0:{http_port} with "
            "[settings.tls] enabled). Env: TENEMENT_BIND.",
        )
        parser.add_argument(
            "--https-bind",
            metavar="HOST:PORT",
            default=os.environ.get("TENEMENT_HTTPS_BIND") or None,
            help="Address for HTTPS with [settings.tls] enabled (default "
            "0.0.0.0:{https_port}). Env: TENEMENT_HTTPS_BIND.",
        )
        parser.add_argument(
            "--metrics-bind",
            metavar="unix:PATH|HOST:PORT",
            default=os.environ.get("TENEMENT_METRICS_BIND") or None,
            help="A second listener serving only /metrics, /status and /health, without a "
            "token. unix:PATH is created 0600, out of tenants' reach; a HOST:PORT is "
            "reachable by tenants with network = host. Env: TENEMENT_METRICS_BIND.",
        )
        parser.add_argument("--no-http", action="store_true", help="Supervise only; no HTTP.")
        parser.add_argument(
            "--domain",
            metavar="DOMAIN",
            help="Control host; tenants live at ID.SERVICE.DOMAIN. Env: TENEMENT_DOMAIN.",
        )
        parser.add_argument(
            "--data-dir",
            metavar="DIR",
            help="State directory: database, secret key, tenant data. Env: TENEMENT_DATA_DIR.",
        )
        parser.add_argument(
            "--no-migrate", action="store_true", help="Do not apply database migrations first."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # Before anything writes: a refused second supervisor must change nothing.
        try:
            with data_dir_lock(settings.TENEMENT_DATA_DIR):
                self.run(options)
        except DataDirBusy as e:
            raise CommandError(str(e)) from None

    def run(self, options: dict[str, Any]) -> None:
        # Read (not yet applied) first: [settings.tls] decides which listeners there are.
        config = self.read(options["config"]) if options["config"] else None
        # Listen first: a port in use stops us before the database or any instance is
        # touched (the [instances] of --config would otherwise be marked to start).
        extra = {}
        if not options["no_http"]:
            extra.update(self.listeners(options, config.tls if config else None))
        elif options["https_bind"]:
            raise CommandError("--https-bind needs the HTTP server: drop --no-http")
        if options["metrics_bind"]:
            extra["tenement-metrics-http"] = self.metrics_listener(options["metrics_bind"])
        if not options["no_migrate"]:
            ensure_migrated(self.stdout.write)
        if config is not None:
            self.load(config)
        if not options["no_http"]:
            # The dashboard's charts: this process serves both the proxy and the pages.
            extra["tenement-timeline"] = sample_loop
            self.hint_login()
        self.report_isolation()
        if (notify := systemd.from_environment()) is not None:
            # Type=notify: READY and WATCHDOG follow /health's checks.
            extra["tenement-systemd"] = systemd.task(*notify)
        drain = frozenset({"tenement-http", "tenement-https", "tenement-metrics-http"})
        supervisor = Supervisor(extra_tasks=extra, drain_tasks=drain)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            code = runner.run(supervisor.run())
        release_cgroups(host().cgroups)
        exit_now_if_stuck(code)
        if code:
            raise SystemExit(code)

    def listeners(self, options: dict[str, Any], tls: TlsConfig | None) -> dict[str, Any]:
        """The HTTP listener, and with TLS the HTTPS one and the ACME renewal loop."""
        if tls is None and options["https_bind"]:
            raise CommandError("--https-bind needs [settings.tls] enabled = true in --config")
        default_bind = f"0.0.0.0:{tls.http_port}" if tls else "127.0.0.1:8000"
        bind = options["bind"] or default_bind
        try:
            http_sock = bind_socket(bind)
            https_bind = options["https_bind"] or (f"0.0.0.0:{tls.https_port}" if tls else "")
            https_sock = bind_socket(https_bind) if tls else None
        except (OSError, ValueError) as e:
            raise CommandError(str(e)) from None
        domain = settings.TENEMENT_DOMAIN
        if tls is None or https_sock is None:
            self.stdout.write(f"Listening on http://{bind} (control host {domain})")
            return {"tenement-http": http_task(http_sock)}
        try:
            manager = tls_service.start_manager(tls)
        except (OSError, ValueError) as e:
            raise CommandError(f"settings.tls: {e}") from None
        mask_dir(str(tls.cache_dir))
        self.stdout.write(
            f"Listening on http://{bind} and https://{https_bind} (control host {domain})"
        )
        return {
            "tenement-http": http_task(http_sock, wrap=tls_service.http_wrapper(manager)),
            **tls_service.tasks(manager, https_sock),
        }

    def metrics_listener(self, bind: str) -> Any:
        try:
            sock = bind_private_socket(bind)
        except (OSError, ValueError) as e:
            raise CommandError(str(e)) from None
        self.stdout.write(f"Metrics (no token) on {bind}")
        if bind.startswith("unix:"):
            mask(bind.removeprefix("unix:"))  # no sandbox may reach it, whatever its uid
        if not bind.startswith("unix:"):
            self.stderr.write(
                f"warning: --metrics-bind {bind} is a TCP address: tenants with network = host "
                "can reach it and read every tenant's metrics; prefer unix:PATH"
            )
        return http_task(sock, private=True)

    def report_isolation(self) -> None:
        """Say how every service's tenants are confined, or why they cannot be."""
        for line in isolation_report():
            self.stdout.write(line)

    def hint_login(self) -> None:
        """A first run has no account that can open the dashboard: say how to make one."""
        if not get_user_model().objects.filter(is_staff=True, is_active=True).exists():
            self.stdout.write(
                "No staff account yet: run `manage.py createsuperuser` to log in to the dashboard."
            )

    def read(self, path: str) -> LoadedConfig:
        try:
            return load_config(path, settings.TENEMENT_DATA_DIR)
        except ConfigError as e:
            raise CommandError(str(e)) from None

    def load(self, config: LoadedConfig) -> None:
        try:
            report = apply_config(config)
        except ConfigError as e:  # e.g. a pin to a release that does not exist
            raise CommandError(str(e)) from None
        started = start_config_instances(config)
        self.stdout.write(f"Loaded {config.path}:")
        for line in report.lines():
            self.stdout.write(f"  {line}")
        self.stdout.write(f"  starting {started} instance(s) listed in [instances]")


def exit_now_if_stuck(code: int) -> None:
    """Every instance is stopped by now. A thread still inside a database call (asgiref's,
    a dashboard query on a locked SQLite) is joined at interpreter exit and would hold it
    for as long as the database does: a watchdog ends the process if exit takes longer."""
    threading.Thread(
        target=_exit_after, args=(code, EXIT_GRACE), name="tenement-exit-watchdog", daemon=True
    ).start()


def _exit_after(code: int, grace: float) -> None:
    time.sleep(grace)  # a plain timer: nothing to wait on but the interpreter's own exit
    logging.getLogger("tenement.supervisor").warning(
        "exit held up by busy threads (database calls) for %gs; exiting now", grace
    )
    logging.shutdown()
    os._exit(code)
