"""Log search on 1,000,000 stored lines: SQLite FTS5 and PostgreSQL, side by side, one run.

Each engine gets a throwaway database (PostgreSQL: a cluster from Debian's packages via
tests/postgres.py, skipped with a note if it is not installed), migrated like a real
install, filled with realistic lines from 1,000 instances through the real write path
(the FTS triggers, the GIN index), then each search below is timed as the median of
--repeat runs after one warm-up. Figures are milliseconds for the whole search() call:
query, highlighting and building the hits.

    python bench/log_search.py [--lines 1000000] [--instances 1000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from common import REPO, log

WORKER_TIMEOUT = 900
BATCH = 20_000
# Rare enough to sit in a handful of lines; the planted count is checked below.
RARE_EVERY = 100_000

PATHS = ["/", "/api/notes", "/api/notes/{n}", "/login", "/static/app.js", "/health", "/ws"]
STATUS = [200] * 20 + [201, 204, 301, 304, 400, 401, 403, 404, 404, 500, 502]
WORKERS = ["mailer", "indexer", "billing", "thumbnailer", "webhooks"]
ERRORS = [
    "connection refused while contacting {host}:5432 (attempt {n})",
    "timeout after 30s waiting for upstream {host}",
    "KeyError: 'owner' in notes.views.get_note",
    "permission denied for user u{n}",
    "database is locked, retrying in {n}ms",
]


def line(rng: random.Random, n: int) -> tuple[str, str]:
    """One (stream, text) in the mix of a web app: access log, app log, errors, JSON."""
    if n % RARE_EVERY == 7:
        return "stderr", f"ERROR worker {rng.choice(WORKERS)}: deadlock detected, rolling back"
    kind = rng.random()
    ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind < 0.55:
        path = rng.choice(PATHS).format(n=rng.randrange(100_000))
        method = "GET" if rng.random() < 0.8 else "POST"
        return "stdout", (
            f'{ip} - - "{method} {path} HTTP/1.1" {rng.choice(STATUS)} '
            f"{rng.randrange(100, 90_000)} {rng.uniform(0.2, 900):.1f}ms"
        )
    if kind < 0.80:
        return "stdout", (
            f"INFO worker {rng.choice(WORKERS)}: processed job {rng.getrandbits(48):012x} "
            f"in {rng.randrange(1, 5000)}ms"
        )
    if kind < 0.92:
        return "stdout", json.dumps(
            {"level": "info", "msg": "session started", "user": f"u{rng.randrange(50_000)}"}
        )
    error = rng.choice(ERRORS).format(host=f"db{rng.randrange(4)}", n=rng.randrange(1, 9))
    return "stderr", f"ERROR {error}"


# -- worker: runs in a subprocess with the engine's DATABASE_URL ---------------------------


def worker(lines: int, instances: int, repeat: int) -> dict[str, Any]:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tenement_site.settings")
    django.setup()
    from django.core.management import call_command
    from django.db import connection

    call_command("migrate", verbosity=0)
    pks = make_instances(instances)
    started = time.perf_counter()
    fill(pks, lines)
    fill_s = time.perf_counter() - started
    if connection.vendor == "postgresql":
        with connection.cursor() as c:
            c.execute("ANALYZE instances_logline")  # what autovacuum does after a bulk load
    # In this order: flush_costs rebuilds the index, which would then be a fresh one.
    results = {"vendor": connection.vendor, "fill_lines_per_s": lines / fill_s}
    results["size_mb"] = database_mb()
    results["searches"] = time_searches(pks, repeat)
    results["flush_ms"] = flush_costs(pks[0])
    return results


def make_instances(count: int) -> list[int]:
    from instances.models import Instance, Service

    services = [
        Service.objects.create(name=f"app{s}", command="true", data_dir="/tmp") for s in range(10)
    ]
    Instance.objects.bulk_create(
        Instance(service=services[i % 10], instance_id=f"t{i:04d}") for i in range(count)
    )
    return list(Instance.objects.order_by("id").values_list("id", flat=True))


def fill(pks: list[int], total: int) -> None:
    """Insert in batches of BATCH rows, one transaction each, times rising with the id."""
    from django.db import connection, transaction

    rng = random.Random(42)
    start = datetime.now(UTC) - timedelta(days=7)
    step = timedelta(days=7) / total
    adapt = connection.ops.adapt_datetimefield_value
    for first in range(0, total, BATCH):
        rows = []
        for n in range(first, min(first + BATCH, total)):
            stream, text = line(rng, n)
            rows.append((rng.choice(pks), stream, adapt(start + n * step), text))
        with transaction.atomic():
            insert(rows)
        if (first + BATCH) % 100_000 == 0:
            log(f"  {connection.vendor}: {first + BATCH:,} lines")


def insert(rows: list[tuple[int, str, object, str]]) -> None:
    from django.db import connection

    columns = "instance_id, stream, time, text"
    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            with c.cursor.copy(f"COPY instances_logline ({columns}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            values = "%s, %s, %s, %s"
            c.executemany(f"INSERT INTO instances_logline ({columns}) VALUES ({values})", rows)


def database_mb() -> float:
    from django.db import connection

    with connection.cursor() as c:
        if connection.vendor == "postgresql":
            c.execute("SELECT pg_database_size(current_database())")
            return c.fetchone()[0] / 2**20
        c.execute("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
        return c.fetchone()[0] / 2**20


def flush_costs(pk: int) -> dict[str, float]:
    """Milliseconds for one log flush (2,000 lines by bulk_create, as LogCollector writes,
    and the commit: FTS5 writes its index then), with the search index and without; and
    seconds to drop the index and to build it again over the stored lines (migration 0002
    backwards and forwards)."""
    from django.core.management import call_command

    migration = importlib.import_module("instances.migrations.0003_logline_search").Migration
    costs = {"with index": statistics.median(flush(pk) for _ in range(5))}
    started = time.perf_counter()
    call_command("migrate", *migration.dependencies[0], verbosity=0, skip_checks=True)
    costs["drop s"] = time.perf_counter() - started
    costs["without index"] = statistics.median(flush(pk) for _ in range(5))
    started = time.perf_counter()
    call_command("migrate", "instances", verbosity=0, skip_checks=True)
    costs["build s"] = time.perf_counter() - started
    return costs


def flush(pk: int) -> float:
    from django.db import transaction

    from instances.models import LogLine

    rng = random.Random(7)
    now = datetime.now(UTC)
    lines = [line(rng, n + 1) for n in range(2000)]
    rows = [LogLine(instance_id=pk, stream=s, time=now, text=t) for s, t in lines]
    started = time.perf_counter()
    with transaction.atomic():
        LogLine.objects.bulk_create(rows, batch_size=500)
    took = (time.perf_counter() - started) * 1000
    LogLine.objects.filter(id__in=[r.id for r in rows]).delete()
    return took


def time_searches(pks: list[int], repeat: int) -> dict[str, tuple[float, int]]:
    from instances.logsearch import search
    from instances.models import LogLine

    newest = LogLine.objects.order_by("-id").values_list("id", flat=True).first()
    deep = newest - 900_000 if newest > 900_000 else newest // 10
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    cases: dict[str, Callable[[], list[Any]]] = {
        "one word (error), by rank": lambda: search("error"),
        "one word (error), newest": lambda: search("error", order="newest"),
        "very common word (get), by rank": lambda: search("get"),
        'phrase ("connection refused")': lambda: search('"connection refused"'),
        "rare word (deadlock)": lambda: search("deadlock"),
        "word + exclusion (error -timeout)": lambda: search("error -timeout"),
        "word + 1 instance (error)": lambda: search("error", instance_ids=[pks[500]]),
        "word + stderr + last hour (timeout)": lambda: search(
            "timeout", stream="stderr", since=hour_ago
        ),
        "word, an hour 3 days ago (error)": lambda: search(
            "error", since=three_days_ago, until=three_days_ago + timedelta(hours=1)
        ),
        "newest-first page 1 (no query)": lambda: search(None),
        "newest-first page 1, 1 instance": lambda: search(None, instance_ids=[pks[500]]),
        "deep keyset page (no query)": lambda: search(None, before_id=deep),
        "deep keyset page (error, newest)": lambda: search("error", order="newest", before_id=deep),
    }
    return {name: timed(run, repeat) for name, run in cases.items()}


def timed(run: Callable[[], list[Any]], repeat: int) -> tuple[float, int]:
    """Median milliseconds of `repeat` runs after a warm-up, and the number of hits."""
    hits = len(run())
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), hits


# -- parent: one worker per engine, then the table ------------------------------------------


def run_worker(env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--lines", str(args.lines)]
    cmd += ["--instances", str(args.instances), "--repeat", str(args.repeat)]
    inherited = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    out = subprocess.run(
        cmd, env={**inherited, **env}, stdout=subprocess.PIPE, timeout=WORKER_TIMEOUT, check=True
    )
    return json.loads(out.stdout)


@contextlib.contextmanager
def postgresql() -> Iterator[str | None]:
    sys.path.insert(0, str(REPO))
    from tests import postgres

    # A UTF-8 cluster: under the C locale initdb picks SQL_ASCII, and the text search
    # parser would not see accented letters as letters.
    os.environ.setdefault("LC_ALL", "C.UTF-8")
    try:
        with postgres.cluster() as base:
            yield postgres.create_database(base, "logbench")
    except RuntimeError as e:
        log(f"PostgreSQL skipped: {e}")
        yield None


def report(results: list[dict[str, Any]]) -> None:
    names = [r["vendor"] for r in results]
    print(f"| search | {' | '.join(f'{n} ms (hits)' for n in names)} |")
    print(f"|---|{'---|' * len(names)}")
    for case in results[0]["searches"]:
        cells = [f"{ms:.1f} ({hits})" for ms, hits in (r["searches"][case] for r in results)]
        print(f"| {case} | {' | '.join(cells)} |")
    print()
    for r in results:
        flush = r["flush_ms"]
        print(
            f"- {r['vendor']}: filled at {r['fill_lines_per_s']:,.0f} lines/s; database "
            f"{r['size_mb']:,.0f} MB; a 2,000-line log flush takes "
            f"{flush['with index']:.1f} ms with the search index, "
            f"{flush['without index']:.1f} ms without; building the index over the "
            f"stored lines (migration 0002) takes {flush['build s']:.1f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.lines, args.instances, args.repeat)))
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="logbench") as tmp:
        log(f"SQLite: {args.lines:,} lines across {args.instances:,} instances")
        results.append(run_worker({"TENEMENT_DATA_DIR": tmp}, args))
        with postgresql() as url:
            if url:
                log(f"PostgreSQL: {args.lines:,} lines across {args.instances:,} instances")
                env = {"TENEMENT_DATA_DIR": tmp, "DATABASE_URL": url}
                results.append(run_worker(env, args))
    report(results)


if __name__ == "__main__":
    main()
