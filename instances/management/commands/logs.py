from __future__ import annotations

import time
from typing import Any

from django.db.models import QuerySet

from instances import operations as ops
from instances.management.base import OperatorCommand, key_arg
from instances.models import LogLine

FOLLOW_POLL = 0.5


class Command(OperatorCommand):
    help = "Show captured stdout/stderr of an instance (or all). --follow keeps printing new lines."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("key", nargs="?", type=key_arg, metavar="SERVICE:ID")
        parser.add_argument("--stream", choices=["stdout", "stderr"])
        parser.add_argument("--grep", metavar="TEXT", help="Only lines containing TEXT.")
        parser.add_argument("--limit", type=int, default=100, help="Last N lines (default 100).")
        parser.add_argument("-f", "--follow", action="store_true", help="Keep printing new lines.")

    def handle(self, *args: Any, **options: Any) -> None:
        qs = self.query(options)
        lines = list(qs.order_by("-id")[: max(0, options["limit"])])[::-1]
        last = (
            lines[-1].id
            if lines
            else (qs.order_by("-id").values_list("id", flat=True).first() or 0)
        )
        for line in lines:
            self.emit(line, options)
        if not options["follow"]:
            return
        try:
            while True:
                # Another process writes these rows; polling is the only signal we have here.
                time.sleep(FOLLOW_POLL)
                for line in qs.filter(id__gt=last).order_by("id")[:1000]:
                    self.emit(line, options)
                    last = line.id
        except KeyboardInterrupt:
            return

    def query(self, options: dict[str, Any]) -> QuerySet[LogLine]:
        qs = LogLine.objects.select_related("instance__service")
        if options["key"]:
            qs = qs.filter(instance=ops.get_instance(options["key"]))
        if options["stream"]:
            qs = qs.filter(stream=options["stream"])
        if options["grep"]:
            qs = qs.filter(text__contains=options["grep"])
        return qs

    def emit(self, line: LogLine, options: dict[str, Any]) -> None:
        prefix = "" if options["key"] else f"{line.instance.key} "
        stamp = line.time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.stdout.write(f"{stamp} {prefix}{line.stream}| {line.text}")
        self.stdout.flush()
