"""token create, list, revoke: API bearer tokens (the API allows this to admin tokens only)."""

from __future__ import annotations

from argparse import Namespace
from datetime import UTC, datetime
from typing import Any

from instances.cli.client import Exit, api_path, client_from
from instances.cli.output import ago, local_time, note, parse_time, print_json, table

HEADERS = ("NAME", "PREFIX", "SCOPE", "TENANT", "STATUS", "EXPIRES", "LAST USED", "CREATED")


def create(args: Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "scope": args.scope}
    if args.tenant:
        body["tenant"] = args.tenant
    if args.expires is not None:
        body["expires_days"] = args.expires
    token = client_from(args).call("POST", api_path("tokens"), body=body)
    if args.json:
        print_json(token)
        return Exit.OK
    limits = f", tenant {token['tenant']}" if token.get("tenant") else ""
    limits += f", expires {local_time(token['expires_at'])}" if token.get("expires_at") else ""
    note(f"Created token {token['name']!r} (scope {token['scope']}{limits}). Shown once:")
    print(token["token"])  # last line of stdout, so `$(ten token create ...)` captures it
    return Exit.OK


def list_(args: Namespace) -> int:
    tokens = client_from(args).call("GET", api_path("tokens"))
    if args.json:
        print_json(tokens)
        return Exit.OK
    rows = [row(t) for t in sorted(tokens, key=lambda t: t["name"])]
    print(table(HEADERS, rows))
    return Exit.OK


def row(t: dict[str, Any]) -> list[Any]:
    return [
        t["name"],
        t["prefix"],
        t["scope"],
        t["tenant"] or "-",
        status(t),
        local_time(t["expires_at"]) if t["expires_at"] else "never",
        ago(t["last_used_at"]) if t["last_used_at"] else "never",
        local_time(t["created_at"]),
    ]


def status(t: dict[str, Any]) -> str:
    if t["revoked_at"]:
        return "revoked"
    expires = parse_time(t["expires_at"])
    return "expired" if expires and expires <= datetime.now(UTC) else "active"


def revoke(args: Namespace) -> int:
    client_from(args).call("DELETE", api_path("tokens", args.name))
    if args.json:
        print_json({"revoked": args.name})  # the API answers 204: nothing of its own to show
    else:
        print(f"revoked token {args.name!r}")
    return Exit.OK
