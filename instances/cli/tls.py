"""`ten tls status` and `ten domain add|remove|list`."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from instances.cli.client import Exit, api_path, client_from
from instances.cli.output import local_time, print_json, table

CERT_HEADERS = ("NAMES", "ISSUER", "SOURCE", "EXPIRES", "NEXT RENEWAL", "LAST ERROR")
DOMAIN_HEADERS = ("DOMAIN", "INSTANCE", "ROUTED", "ADDED")


def status(args: Namespace) -> int:
    data = client_from(args).call("GET", api_path("tls", "status", slash=False))
    if args.json:
        print_json(data)
        return Exit.OK
    if not data["enabled"]:
        print(f"TLS is off. {data.get('recommendation') or ''}".strip())
        return Exit.OK
    print(
        f"TLS on for {data['domain']}: https port {data['https_port']}, http port "
        f"{data['http_port']}, CA {data.get('directory_url', '-')}"
    )
    orders = data.get("orders") or {}
    print("orders: " + (", ".join(f"{k} {v}" for k, v in sorted(orders.items())) or "none"))
    rows = [cert_row(c) for c in data.get("certificates", [])]
    print(table(CERT_HEADERS, rows))
    failing = any(c["last_error"] for c in data.get("certificates", []))
    return Exit.FAILED if failing else Exit.OK


def cert_row(c: dict[str, Any]) -> list[Any]:
    error = c["last_error"]
    if error and c.get("retry_in_seconds") is not None:
        error = f"{error} (retry in {c['retry_in_seconds']:.0f}s)"
    return [
        ",".join(c["names"]),
        c["issuer"] or "-",
        c["source"] or "-",
        local_time(c["not_after"]) if c["not_after"] else "none yet",
        local_time(c["next_renewal"]) if c["next_renewal"] else "-",
        error or "-",
    ]


def domain_list(args: Namespace) -> int:
    rows = client_from(args).call("GET", api_path("domains"))
    if args.json:
        print_json(rows)
        return Exit.OK
    print(table(DOMAIN_HEADERS, [domain_row(d) for d in rows]))
    return Exit.OK


def domain_row(d: dict[str, Any]) -> list[Any]:
    routed = "yes" if d["routed"] else "after TXT verification"
    return [d["name"], d["instance"], routed, local_time(d["created_at"])]


def domain_add(args: Namespace) -> int:
    body = {"name": args.domain, "instance": args.instance, "verification": args.verify}
    added = client_from(args).call("POST", api_path("domains"), body=body)
    if args.json:
        print_json(added)
    elif added["routed"]:
        print(f"{added['name']} -> {added['instance']}")
    else:
        record = added["txt_record"]
        print(f"{added['name']} -> {added['instance']}, routed once verified: publish")
        print(f'  {record["name"]}. TXT "{record["value"]}"')
        print(f"then run: ten domain verify {added['name']}")
    return Exit.OK


def domain_verify(args: Namespace) -> int:
    verified = client_from(args).call("POST", api_path("domains", args.domain, "verify"))
    if args.json:
        print_json(verified)
    else:
        print(f"{verified['name']} verified: now routed to {verified['instance']}")
    return Exit.OK


def domain_remove(args: Namespace) -> int:
    client_from(args).call("DELETE", api_path("domains", args.domain))
    if args.json:
        print_json({"removed": args.domain})
    else:
        print(f"removed {args.domain}")
    return Exit.OK


def add_verbs(verbs: Any, instance_key: Any) -> None:
    """`tls` and `domain` verb groups (verbs: instances.cli.app.Verbs)."""
    tls = verbs.add("tls", None, "HTTPS certificates (built-in ACME).")
    sub = type(verbs)(tls, verbs.common)
    sub.add(
        "status",
        status,
        "Show each certificate's names, issuer, expiry, next renewal and last error.",
        "Exit 1 if an order is failing (the CA refused or cannot be reached).",
    )
    domain = verbs.add("domain", None, "Tenants' own domains, routed like their own host.")
    sub = type(verbs)(domain, verbs.common)
    sub.add("list", domain_list, "List custom domains (a tenant token: its own).")
    add = sub.add(
        "add",
        domain_add,
        "Route a domain to an instance (needs a write token).",
        "The domain's DNS must point at this server; with TLS on_demand its certificate\n"
        "is obtained on its first HTTPS handshake.",
    )
    add.add_argument("domain", metavar="DOMAIN", help="e.g. notes.alice-corp.com")
    add.add_argument("instance", metavar="SVC:ID", type=instance_key)
    add.add_argument(
        "--verify",
        choices=("none", "txt"),
        default="none",
        help="txt: route it only once `ten domain verify` finds a TXT record (printed)",
    )
    verify = sub.add(
        "verify",
        domain_verify,
        "Check a domain's TXT record now and route it (needs a write token).",
        "Exit 2 with what DNS has instead if the record is not there yet.",
    )
    verify.add_argument("domain", metavar="DOMAIN")
    remove = sub.add("remove", domain_remove, "Stop routing a domain (needs a write token).")
    remove.add_argument("domain", metavar="DOMAIN")
