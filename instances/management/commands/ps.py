from __future__ import annotations

import json
import time
from typing import Any

from django.core.management.base import CommandError

from instances.management.base import OperatorCommand, human_seconds, table
from instances.models import Instance, Service
from instances.operations import supervisor_alive


class Command(OperatorCommand):
    help = "List instances: state, pid, uptime, idle time, restarts, health."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("service", nargs="?", help="Only this service.")
        parser.add_argument("--state", choices=Instance.State.values, help="Only this state.")
        parser.add_argument("--json", action="store_true", help="Machine-readable output.")

    def handle(self, *args: Any, **options: Any) -> None:
        qs = Instance.objects.select_related("service")
        if options["service"]:
            name = options["service"]
            if not Service.objects.filter(name=name).exists():
                known = ", ".join(Service.objects.order_by("name").values_list("name", flat=True))
                raise CommandError(f"no such service: {name} (services: {known or 'none'})")
            qs = qs.filter(service__name=name)
        if options["state"]:
            qs = qs.filter(state=options["state"])
        now = time.time()
        rows = [self.row(i, now) for i in qs]
        if options["json"]:
            self.stdout.write(json.dumps(rows, indent=2))
            return
        if not supervisor_alive(now):
            self.stderr.write("note: no supervisor is running; states are as it left them")
        headers = [
            "INSTANCE",
            "STATE",
            "DESIRED",
            "PID",
            "UPTIME",
            "IDLE",
            "RESTARTS",
            "HEALTH",
            "ISOLATION",
        ]
        cells = [
            [
                r["instance"],
                r["state"],
                r["desired"],
                r["pid"],
                human_seconds(r["uptime"]),
                human_seconds(r["idle"]),
                r["restarts"],
                r["health"],
                r["isolation"],
            ]
            for r in rows
        ]
        self.stdout.write(table(cells, headers) if rows else "no instances registered")

    @staticmethod
    def row(i: Instance, now: float) -> dict[str, Any]:
        health = {True: "ok", False: "failing", None: None}[i.health_ok]
        return {
            "instance": str(i.key),
            "state": i.state,
            "desired": i.desired_state,
            "pid": i.pid,
            "uptime": i.uptime_seconds(now),
            "idle": i.idle_seconds(now),
            "restarts": i.restart_count,
            "health": health if i.state == "running" else None,
            "always_on": i.always_on,
            "last_error": i.last_error or None,
            # As it last started (the service's level and limits, the tenant's uid).
            "isolation": i.isolation or None,
            "uid": i.uid,
            # Where the proxy reaches it: its socket, or tcp:127.0.0.1:PORT; and its $PORT.
            "upstream": i.socket_path or None,
            "port": i.port,
        }
