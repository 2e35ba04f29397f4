"""GET /health (liveness) and GET /status (what the fleet is doing), on the control host.

/health is for systemd and load balancers: no login, cheap, 200 or 503 with a JSON reason.
It checks the serving event loop's lag, that the database answers, and that a supervisor
is alive: the one in this process (embedded runsupervisor), or else a fresh heartbeat.

/status is for operators: instances by service and state, the proxy's open connections
and wakes in flight, the last errors, version and uptime. Who may read it is /metrics'
rule (instances/metrics_view.refusal): the private listener, or a fleet-wide read-scope token.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
import weakref
from importlib import metadata
from typing import Any

import psutil
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connections
from django.db.models import Count
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from instances import metrics_view
from instances.models import Event, Instance, Service, SupervisorHeartbeat
from instances.operations import HEARTBEAT_STALE_AFTER
from instances.supervisor import fds
from instances.supervisor.core import Supervisor, running_here
from proxy import state as proxy_state

log = logging.getLogger("tenement.health")

DB_TIMEOUT = 3.0
# The reconcile loop runs at least once a second; silent this long, it is stuck.
STALL_AFTER = 30.0
LAG_INTERVAL, LAG_WINDOW = 0.5, 10  # a reading every 0.5 s; the worst of the last 5 s counts
ERROR_KINDS = ("backoff", "failed", "health_failed")
LAST_ERRORS = 10
NO_STORE = {"Cache-Control": "no-store"}
PROCESS_STARTED = psutil.Process().create_time()

Check = dict[str, Any]


# ---- event-loop lag -------------------------------------------------------------------


class LagMonitor:
    """How late the loop runs its timers: a loop blocked by slow code fires them late.

    A chain of call_at timers rather than a task: nothing to cancel at shutdown, and it
    holds no reference to the loop (a callback finds its loop itself).
    """

    def __init__(self, interval: float = LAG_INTERVAL, window: int = LAG_WINDOW) -> None:
        self.interval = interval
        self.readings: collections.deque[float] = collections.deque(maxlen=window)
        self._due = 0.0
        self._schedule(asyncio.get_running_loop())

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.interval
        loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.readings.append(max(0.0, loop.time() - self._due))
        self._schedule(loop)

    def worst(self) -> float:
        return max(self.readings, default=0.0)


_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LagMonitor] = (
    weakref.WeakKeyDictionary()
)


async def loop_check() -> Check:
    loop = asyncio.get_running_loop()
    monitor = _monitors.get(loop)
    if monitor is None:
        monitor = _monitors[loop] = LagMonitor()
    began = loop.time()
    await asyncio.sleep(0)  # one trip through the ready queue: how busy is it right now
    lag_ms = round(max(loop.time() - began, monitor.worst()) * 1000, 1)
    limit = settings.TENEMENT_HEALTH_MAX_LAG_MS
    if lag_ms > limit:
        return {"ok": False, "lag_ms": lag_ms, "error": f"event loop lag {lag_ms:g} ms > {limit}"}
    return {"ok": True, "lag_ms": lag_ms}


# ---- database -----------------------------------------------------------------------

# One thread: a hung database ties up at most this one, never the supervisor's.
_db_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tenement-health")
_db_pending: concurrent.futures.Future[float | None] | None = None


def probe_database() -> float | None:
    """SELECT 1 on a fresh connection; returns the supervisor heartbeat (epoch) if any."""
    conn = connections["default"]
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        beat = SupervisorHeartbeat.objects.filter(pk=1).values_list("beat_at", flat=True).first()
        return beat.timestamp() if beat is not None else None
    finally:
        conn.close()  # a restarted server must not leave us holding a dead connection


async def database_check() -> tuple[Check, float | None]:
    """The database's answer, bounded by DB_TIMEOUT; and the heartbeat it holds."""
    global _db_pending
    if _db_pending is not None and not _db_pending.done():
        return {"ok": False, "error": "an earlier check is still waiting for the database"}, None
    began = time.monotonic()
    _db_pending = _db_thread.submit(probe_database)
    try:
        beat = await asyncio.wait_for(asyncio.wrap_future(_db_pending), DB_TIMEOUT)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {DB_TIMEOUT:g}s"}, None
    except Exception as e:  # never a traceback to the client; the detail goes to our log
        log.warning("database check failed: %s", e, extra={"event": "health_database"})
        kind = "unreachable" if isinstance(e, DatabaseError) else "check failed"
        return {"ok": False, "error": f"{kind} ({type(e).__name__})"}, None
    return {"ok": True, "ms": round((time.monotonic() - began) * 1000, 1)}, beat


# ---- supervisor ---------------------------------------------------------------------


def supervisor_check(heartbeat: float | None, db_ok: bool) -> Check:
    supervisor = running_here()
    if supervisor is not None:
        return in_process_check(supervisor)
    # A separate web process (daphne, uvicorn workers): the supervisor's heartbeat row.
    check: Check = {"mode": "heartbeat"}
    if not db_ok:
        return check | {"ok": False, "error": "unknown: the database is unreachable"}
    if heartbeat is None:
        return check | {"ok": False, "error": "no supervisor is running (no heartbeat)"}
    age = round(time.time() - heartbeat, 1)
    if age >= HEARTBEAT_STALE_AFTER:
        return check | {"ok": False, "heartbeat_age_s": age, "error": f"no heartbeat for {age}s"}
    return check | {"ok": True, "heartbeat_age_s": age}


def in_process_check(supervisor: Supervisor) -> Check:
    check: Check = {"mode": "in-process"}
    if supervisor.stop_event.is_set():
        return check | {"ok": False, "error": "shutting down"}
    dead = [task.get_name() for task in supervisor.tasks if task.done()]
    if dead:
        return check | {"ok": False, "error": f"task {', '.join(dead)} stopped"}
    since = round(supervisor.clock() - supervisor.last_tick, 2)
    if since > STALL_AFTER:
        return check | {"ok": False, "error": f"the reconcile loop has not run for {since:g}s"}
    return check | {"ok": True, "last_tick_s": since}


def fd_check() -> Check:
    check = fds.pressure.as_dict()
    if not check["ok"]:
        check["error"] = f"out of file descriptors ({check['last_exhausted_in']})"
    return check


# ---- /health ------------------------------------------------------------------------


async def run_checks() -> tuple[dict[str, Check], str]:
    """Every check of /health, and the reason it fails ("" when healthy). The systemd
    watchdog (instances/systemd.py) is fed from the same checks."""
    loop = await loop_check()
    database, heartbeat = await database_check()
    checks = {
        "event_loop": loop,
        "database": database,
        "supervisor": supervisor_check(heartbeat, database["ok"]),
        # Unhealthy while this process is out of descriptors (and for 10 s after).
        "file_descriptors": fd_check(),
    }
    failing = [f"{name}: {check['error']}" for name, check in checks.items() if not check["ok"]]
    return checks, "; ".join(failing)


@require_safe
async def health(request: HttpRequest) -> JsonResponse:
    checks, reason = await run_checks()
    if reason:
        body = {"status": "unhealthy", "reason": reason, "checks": checks}
        return JsonResponse(body, status=503, headers=NO_STORE)
    return JsonResponse({"status": "ok", "checks": checks}, headers=NO_STORE)


# ---- /status ------------------------------------------------------------------------


def instance_counts() -> dict[str, Any]:
    states = [choice.value for choice in Instance.State]
    names = Service.objects.order_by("name").values_list("name", flat=True)
    by_service = {name: dict.fromkeys(states, 0) for name in names}
    rows = Instance.objects.order_by().values("service__name", "state").annotate(n=Count("pk"))
    for row in rows:
        by_service.setdefault(row["service__name"], dict.fromkeys(states, 0))
        by_service[row["service__name"]][row["state"]] = row["n"]
    total = {state: sum(counts[state] for counts in by_service.values()) for state in states}
    return {"total": total, "by_service": by_service}


def last_errors() -> list[dict[str, Any]]:
    events = (
        Event.objects.filter(kind__in=ERROR_KINDS)
        .select_related("instance__service")
        .order_by("-time", "-pk")[:LAST_ERRORS]
    )
    return [
        {
            "time": event.time.isoformat(),
            "instance": str(event.instance.key),
            "kind": event.kind,
            "message": event.message,
        }
        for event in events
    ]


def from_database() -> dict[str, Any]:
    return {"instances": instance_counts(), "last_errors": last_errors()}


def from_proxy() -> dict[str, Any]:
    """This process's proxy: requests and WebSockets open, wakes being waited for."""
    state = proxy_state.existing()
    if state is None:  # no tenant request yet: nothing open, nothing waiting
        return {"open_connections": {"total": 0, "by_instance": {}}, "wakes_in_flight": []}
    now = time.monotonic()
    open_now = {str(key): n for key, n in state.open.items() if n > 0}
    wakes = [
        {
            "instance": str(key),
            "held_requests": wake.held,
            "seconds_left": round(wake.deadline - now, 1),
        }
        for key, wake in state.wakes.items()
        if not wake.future.done() and wake.deadline > now
    ]
    return {
        "open_connections": {"total": sum(open_now.values()), "by_instance": open_now},
        "wakes_in_flight": wakes,
    }


def version() -> str:
    try:
        return metadata.version("tenement-django")
    except metadata.PackageNotFoundError:
        return "unknown"


@require_safe
async def status(request: HttpRequest) -> JsonResponse:
    # The same rule as /metrics: the private listener, else a fleet-wide read token.
    if (refused := await sync_to_async(metrics_view.refusal)(request)) is not None:
        return refused
    try:
        fleet = await sync_to_async(from_database)()
    except DatabaseError as e:
        log.warning("status: database error: %s", e, extra={"event": "status_database"})
        error = f"the database is unreachable ({type(e).__name__})"
        return JsonResponse({"error": error}, status=503, headers=NO_STORE)
    body = {
        "version": version(),
        "uptime_s": round(time.time() - PROCESS_STARTED, 1),
        **fleet,
        **from_proxy(),
        "file_descriptors": fds.pressure.as_dict(),
    }
    return JsonResponse(body, headers=NO_STORE)
