"""spawn, stop, restart, ps, health: what instances should do, and how they are doing."""

from __future__ import annotations

import time
from argparse import Namespace
from collections.abc import Callable
from typing import Any

from instances.cli.client import ApiError, Client, CliError, Exit, api_path, client_from
from instances.cli.output import ago, duration, note, print_json, size, table

Instance = dict[str, Any]

POLL_FIRST = 0.1
POLL_MAX = 1.0
PS_HEADERS = ("INSTANCE", "STATE", "PID", "UPTIME", "IDLE", "RESTARTS", "HEALTH", "RSS")
HEALTH_HEADERS = ("INSTANCE", "STATE", "HEALTH", "CHECKED", "LAST ERROR")
CRASHED = ("failed", "backoff")


def spawn(args: Namespace) -> int:
    client = client_from(args)
    service, _, instance_id = args.instance.partition(":")
    body = {"service": service, "instance_id": instance_id, "start": True}
    try:
        instance = client.call("POST", api_path("instances"), body=body)
        what = "registered, starting"
    except ApiError as e:
        if e.status != 409:  # 409: already registered, so starting it is all that is left
            raise
        instance = client.call("POST", api_path("instances", args.instance, "start"))
        what = "start requested"
    if args.wait:
        instance = wait_for(client, instance, lambda i: i["state"] == "running", "running", args)
        what = "running"
    return report(args, instance, what)


def stop(args: Namespace) -> int:
    client = client_from(args)
    instance = client.call("POST", api_path("instances", args.instance, "stop"))
    if args.wait:
        instance = wait_for(
            client, instance, lambda i: i["state"] in ("stopped", "failed"), "stopped", args
        )
        return report(args, instance, instance["state"])
    return report(args, instance, "stop requested")


def restart(args: Namespace) -> int:
    client = client_from(args)
    before = client.call("GET", api_path("instances", args.instance))
    instance = client.call("POST", api_path("instances", args.instance, "restart"))
    if args.wait:
        # Running is not enough: the old process is running too until the supervisor acts.
        def restarted(i: Instance) -> bool:
            return i["state"] == "running" and i["pid"] != before["pid"]

        instance = wait_for(client, instance, restarted, "running again", args)
        return report(args, instance, "restarted")
    return report(args, instance, "restart requested")


def wait_for(
    client: Client, instance: Instance, done: Callable[[Instance], bool], goal: str, args: Namespace
) -> Instance:
    """Poll until done(instance); fail early on a crash loop that began after the request."""
    key = instance["key"]
    deadline = time.monotonic() + args.wait_timeout
    pause = POLL_FIRST
    # `failed` right after a start request may be stale: the supervisor has not acted yet.
    moved = instance["state"] != "failed"
    while not done(instance):
        moved = moved or instance["state"] != "failed"
        if moved and instance["state"] == "failed" and goal != "stopped":
            raise CliError(f"{key} failed: {instance['last_error'] or 'crash loop'}")
        if time.monotonic() + pause > deadline:
            error = f": {instance['last_error']}" if instance.get("last_error") else ""
            raise CliError(
                f"{key} is not {goal} after {args.wait_timeout:g}s "
                f"(state {instance['state']}{error})"
            )
        time.sleep(pause)
        pause = min(pause * 2, POLL_MAX)
        instance = client.call("GET", api_path("instances", key))
    return instance


def report(args: Namespace, instance: Instance, what: str) -> int:
    if args.json:
        print_json(instance)
    else:
        pid = f", pid {instance['pid']}" if instance.get("pid") else ""
        print(f"{instance['key']}: {what} (state {instance['state']}{pid})")
    return Exit.OK


def ps(args: Namespace) -> int:
    query = {"service": args.service, "state": args.state, "all": "true" if args.all else None}
    instances = client_from(args).call("GET", api_path("instances"), query)
    if args.json:
        print_json(instances)
    else:
        rows = [ps_row(i) for i in sorted(instances, key=lambda i: i["key"])]
        print(table(PS_HEADERS, rows))
    return Exit.OK


def deregister(args: Namespace) -> int:
    query = {"purge": "true"} if args.purge else None
    client_from(args).call("POST", api_path("instances", args.instance, "deregister"), query)
    print(f"{args.instance}: deregistered" + (", data deleted" if args.purge else ""))
    return Exit.OK


def ps_row(i: Instance) -> list[Any]:
    return [
        i["key"],
        i["state"],
        i["pid"],
        duration(i["uptime_seconds"]),
        duration(i["idle_seconds"]),
        i["restart_count"],
        health_word(i),
        size(i["rss_bytes"]),
    ]


def health_word(i: Instance) -> str:
    if i["state"] in CRASHED or (i["state"] == "running" and i["health_ok"] is False):
        return "unhealthy"
    if i["state"] == "running" and i["health_ok"]:
        return "healthy"
    return "-"  # stopped (asleep) or in transition: no verdict either way


def health(args: Namespace) -> int:
    client = client_from(args)
    if args.instance:
        found = client.call("GET", api_path("instances", args.instance))
        instances = [found]
    else:
        found = instances = client.call("GET", api_path("instances"))
    if args.json:
        print_json(found)
    else:
        rows = [health_row(i) for i in sorted(instances, key=lambda i: i["key"])]
        print(table(HEALTH_HEADERS, rows))
    bad = [i["key"] for i in instances if health_word(i) == "unhealthy"]
    if bad:
        note(f"ten: unhealthy: {', '.join(sorted(bad))}")
    return Exit.FAILED if bad else Exit.OK


def health_row(i: Instance) -> list[Any]:
    checked = ago(i["health_checked_at"]) if i["state"] == "running" else "-"
    return [i["key"], i["state"], health_word(i), checked, i["last_error"] or "-"]
