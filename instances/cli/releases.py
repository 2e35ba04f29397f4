"""weight, deploy, route (upstream's verbs) and `release ...` (ours): traffic and releases."""

from __future__ import annotations

import argparse
from argparse import Namespace
from typing import Any

from instances.cli.client import Client, Exit, api_path, client_from
from instances.cli.output import note, print_json, table

HEADERS = ("RELEASE", "WEIGHT", "SHARE", "STATE", "TENANTS", "RUNNING", "PINNED", "CREATED BY")
CHANGE_HEADERS = ("TIME", "SERVICE", "KIND", "RELEASE", "INSTANCE", "FROM", "TO", "BY")
# deploy waits for health on the server: the HTTP answer may take that long, and more.
DEPLOY_SLACK = 10.0


# ---- upstream's verbs ------------------------------------------------------------------------


def weight(args: Namespace) -> int:
    body = {"weight": args.weight}
    answer = client_from(args).call(
        "PUT", api_path("instances", args.instance, "weight"), body=body
    )
    if args.json:
        print_json(answer)
    else:
        print(f"Set {answer['instance']} weight to {answer['weight']}")
    return Exit.OK


def deploy(args: Namespace) -> int:
    service, _, version = args.instance.partition(":")
    wait = args.timeout  # upstream's --timeout: how long the server waits for health
    body = {"process": service, "version": version, "weight": args.weight, "timeout": int(wait)}
    note(f"Deploying {args.instance} with weight {args.weight}")
    note(f"Waiting for health check (timeout: {int(wait)}s)...")
    client = Client(args.server, args.token, wait + DEPLOY_SLACK)
    answer = client.call("POST", api_path("deploy", slash=False), body=body)
    if args.json:
        print_json(answer)
        return Exit.OK
    print(f"Deployed {answer['instance']}")
    print(f"Weight: {answer['weight']}")
    print(f"Status: {answer['status']}")
    return Exit.OK


def route(args: Namespace) -> int:
    body = {"process": args.service, "from": args.source, "to": args.dest}
    answer = client_from(args).call("POST", api_path("route", slash=False), body=body)
    if args.json:
        print_json(answer)
        return Exit.OK
    print(f"Routed traffic: {answer['from_instance']} -> {answer['to_instance']}")
    print(f"  {answer['from_instance']} weight = {answer['from_weight']}")
    print(f"  {answer['to_instance']} weight = {answer['to_weight']}")
    return Exit.OK


# ---- release ... ------------------------------------------------------------------------------


def releases_path(service: str, *rest: str) -> str:
    return api_path("services", service, "releases", *rest)


def show(args: Namespace, listing: dict[str, Any]) -> int:
    if args.json:
        print_json(listing)
        return Exit.OK
    rows = [
        (
            r["name"],
            r["weight"],
            f"{r['share']}%",
            r["state"],
            r["tenants"],
            r["running"],
            r["pinned"],
            r["created_by"] or "-",
        )
        for r in listing["releases"]
    ]
    print(table(HEADERS, rows))
    return Exit.OK


def list_(args: Namespace) -> int:
    return show(args, client_from(args).call("GET", releases_path(args.service)))


def create(args: Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.command:
        body["command"] = args.command
    if args.arg is not None:
        body["args"] = args.arg
    if args.env:
        body["env"] = dict(args.env)
    if args.health:
        body["health"] = args.health
    client = client_from(args)
    # With a smoke test, no weight until one tenant has run it healthy.
    body["weight"] = 0 if args.smoke else args.weight
    client.call("POST", releases_path(args.service), body=body)
    note(f"Created release {args.name} of {args.service}")
    if args.smoke:
        smoke = {"tenant": args.smoke, "timeout": int(args.smoke_timeout)}
        slow = Client(args.server, args.token, args.smoke_timeout + DEPLOY_SLACK)
        slow.call("POST", releases_path(args.service, args.name, "smoke"), body=smoke)
        note(f"Smoke test passed: {args.service}:{args.smoke} ran healthy on {args.name}")
        if args.weight:
            client.call(
                "PUT",
                releases_path(args.service, args.name, "weight"),
                body={"weight": args.weight},
            )
    return list_(args)


def set_weight(args: Namespace) -> int:
    path = releases_path(args.service, args.name, "weight")
    return show(args, client_from(args).call("PUT", path, body={"weight": args.weight}))


def switch(args: Namespace) -> int:
    path = releases_path(args.service, args.name, "switch")
    return show(args, client_from(args).call("POST", path))


def retire(args: Namespace) -> int:
    path = releases_path(args.service, args.name, "retire")
    return show(args, client_from(args).call("POST", path))


def rollback(args: Namespace) -> int:
    path = api_path("services", args.service, "rollback")
    return show(args, client_from(args).call("POST", path))


def pin(args: Namespace) -> int:
    body = {"release": args.name or ""}
    answer = client_from(args).call(
        "PUT", api_path("instances", args.instance, "release"), body=body
    )
    if args.json:
        print_json(answer)
    elif answer["release"]:
        print(f"{answer['instance']} pinned to release {answer['release']}")
    else:
        print(f"{answer['instance']} unpinned: it follows the release weights")
    return Exit.OK


def changes(args: Namespace) -> int:
    query = {"service": args.service} if args.service else None
    rows = client_from(args).call("GET", api_path("releases", "changes"), query)
    if args.json:
        print_json(rows)
        return Exit.OK
    print(
        table(
            CHANGE_HEADERS,
            [
                (
                    c["time"][:19],
                    c["service"],
                    c["kind"],
                    c["release"] or "-",
                    c["instance"] or "-",
                    c["from"] or "-",
                    c["to"] or "-",
                    c["actor"],
                )
                for c in rows
            ],
        )
    )
    return Exit.OK


# ---- argument types ---------------------------------------------------------------------------


def percent(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"a weight is a whole number from 0 to 100: {text!r}")
    return int(text)


def env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name, value
