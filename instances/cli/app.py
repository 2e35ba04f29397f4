"""The `ten` command line: argument parsing, environment defaults, one line per error."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from instances.cli import (
    configcheck,
    install,
    lifecycle,
    logs,
    project,
    proxyconf,
    releases,
    tls,
    tokens,
)
from instances.cli.client import CliError, Exit
from instances.ids import InvalidName, check_label, parse_key

DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0
DEFAULT_WAIT = 60.0
STATES = ("stopped", "starting", "running", "stopping", "backoff", "failed")
# Verbs that work without the server (no token needed).
LOCAL_VERBS = frozenset({"init", "config", "token-gen"})

DESCRIPTION = """\
ten: the command-line client of tenement's REST API (upstream `ten` verbs).

It talks to a running `manage.py runsupervisor` over HTTP with a bearer token; make one
on the server with `manage.py createtoken --name NAME --scope read|write|admin`.
Instances are named SERVICE:ID, e.g. notes:alice."""

EPILOG = """\
exit codes:
  0  ok
  1  the operation failed, or an instance is unhealthy
  2  usage error: bad arguments or SVC:ID (or input the server refused, HTTP 400)
  3  not available in this version
  4  cannot connect to the server (check --server or TENEMENT_SERVER)
  5  unauthorised: the token is missing, invalid or lacks the scope/tenant (401, 403)
  6  not found (404): no such instance, service or token
  7  conflict (409)
  8  rate limited after too many failed tokens (429); the message says when to retry

environment:
  TENEMENT_SERVER    default for --server (default: http://127.0.0.1:8000)
  TENEMENT_TOKEN     default for --token; better than --token, which other users can see in ps
  TENEMENT_DATA_DIR  default for --data-dir

token: --token, else TENEMENT_TOKEN, else the file {data_dir}/api_token (`ten token-gen`).
"""

Run = Callable[[argparse.Namespace], int]


def instance_key(text: str) -> str:
    try:
        return str(parse_key(text))
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def label(text: str) -> str:
    try:
        return check_label(text, "name")
    except InvalidName as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 86400: {text!r}")
    return value


def limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1 to 1000: {text!r}")
    return int(text)


def common_options() -> argparse.ArgumentParser:
    """Options accepted before or after the verb, as upstream's are.

    SUPPRESS as the default: a verb's parser must not overwrite a value given before it.
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--server",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"API base URL (env TENEMENT_SERVER, default {DEFAULT_SERVER})",
    )
    group.add_argument(
        "--token", metavar="T", default=argparse.SUPPRESS, help="bearer token (env TENEMENT_TOKEN)"
    )
    group.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="the server's data dir, for {data_dir}/api_token and token-gen (env "
        "TENEMENT_DATA_DIR, else the nearest tenement.toml's data_dir)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the API's JSON instead of a table",
    )
    group.add_argument(
        "--timeout",
        metavar="S",
        type=positive,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for each HTTP answer (default {DEFAULT_TIMEOUT:g})",
    )
    return common


class Verbs:
    """Adds verbs to a subparsers object with the shared options and formatting."""

    def __init__(
        self,
        parent: argparse.ArgumentParser,
        common: argparse.ArgumentParser,
        required: bool = True,
        dest: str = "verb",
    ) -> None:
        self.subparsers = parent.add_subparsers(dest=dest, metavar="VERB", required=required)
        self.common = common

    def add(
        self,
        name: str,
        run: Run | None,
        summary: str,
        details: str = "",
        aliases: tuple[str, ...] = (),
    ) -> argparse.ArgumentParser:
        parser = self.subparsers.add_parser(
            name,
            aliases=list(aliases),
            help=summary,
            description=f"{summary}\n\n{details}".strip(),
            parents=[self.common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if run is not None:
            parser.set_defaults(run=run)
        return parser


def add_wait(parser: argparse.ArgumentParser, goal: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"poll until it is {goal}")
    parser.add_argument(
        "--wait-timeout",
        metavar="S",
        type=positive,
        default=DEFAULT_WAIT,
        help=f"give up waiting after S seconds, exit 1 (default {DEFAULT_WAIT:g})",
    )


def add_lifecycle(verbs: Verbs) -> None:
    spawn = verbs.add(
        "spawn",
        lifecycle.spawn,
        "Start an instance, registering the tenant first if it is new.",
        "Needs a write token. Also clears `failed`. Without --wait it returns once the\n"
        "server has the request; the supervisor starts the process within a second.",
    )
    spawn.add_argument("instance", metavar="SVC:ID", type=instance_key)
    add_wait(spawn, "running (exit 1 if it fails to start)")
    stop = verbs.add(
        "stop",
        lifecycle.stop,
        "Stop an instance (SIGTERM, then SIGKILL after its stop_timeout).",
        "Needs a write token. A stopped instance is woken again by its next request.",
    )
    stop.add_argument("instance", metavar="SVC:ID", type=instance_key)
    add_wait(stop, "stopped")
    restart = verbs.add(
        "restart",
        lifecycle.restart,
        "Restart an instance: stop it and start a new process.",
        "Needs a write token. Starts it if it was not running.",
    )
    restart.add_argument("instance", metavar="SVC:ID", type=instance_key)
    add_wait(restart, "running as a new process")
    deregister = verbs.add(
        "deregister",
        lifecycle.deregister,
        "Forget a tenant: stop its process and remove it (its data dir stays).",
        "Needs a write token. --purge also deletes its data directory, after it stopped.\n"
        "(`stop` keeps the tenant registered; its next request wakes it.)",
    )
    deregister.add_argument("instance", metavar="SVC:ID", type=instance_key)
    deregister.add_argument("--purge", action="store_true", help="also delete its data dir")


def add_status(verbs: Verbs) -> None:
    ps = verbs.add(
        "ps",
        lifecycle.ps,
        "List instances: state, pid, uptime, idle time, restarts, health, memory.",
        "As upstream's: instances with a process (starting, running, backing off, failed);\n"
        "--all adds sleeping (stopped) tenants. HEALTH is healthy or unhealthy for running\n"
        "and crashed instances, '-' otherwise.",
        aliases=("ls",),
    )
    ps.add_argument("--all", "-a", action="store_true", help="also sleeping (stopped) tenants")
    ps.add_argument("--service", metavar="S", type=label, help="only this service's instances")
    ps.add_argument("--state", choices=STATES, help="only instances in this state")
    health = verbs.add(
        "health",
        lifecycle.health,
        "Show health per instance; exit 1 if any is unhealthy.",
        "Unhealthy: failing health checks while running, or crashed (backoff, failed).\n"
        "Stopped instances are asleep, not unhealthy.",
    )
    health.add_argument("instance", metavar="SVC:ID", nargs="?", type=instance_key)


def add_logs(verbs: Verbs) -> None:
    parser = verbs.add(
        "logs",
        logs.logs,
        "Show or search captured stdout/stderr, or follow it live.",
        'Search (--search) takes words, "a phrase" and -excluded words. With --follow it\n'
        "prints the last --limit lines (default 10), then new ones as they arrive, until\n"
        "Ctrl-C (exit 0); with --json, one JSON object per line.",
    )
    parser.add_argument(
        "instance",
        metavar="SVC:ID",
        nargs="?",
        type=instance_key,
        help="one instance (default: all this token may read)",
    )
    parser.add_argument("--search", "-s", metavar="Q", help="full-text search")
    parser.add_argument("--stream", "--level", choices=("stdout", "stderr"), help="one stream")
    parser.add_argument("--limit", "-n", metavar="N", type=limit, help="1 to 1000 (default 100)")
    parser.add_argument("--since", metavar="ISO", help="lines at or after this time")
    parser.add_argument("--until", metavar="ISO", help="lines before this time")
    parser.add_argument(
        "--order",
        choices=("newest", "rank"),
        default="newest",
        help="newest: the latest lines, printed oldest first; rank: best matches first",
    )
    parser.add_argument("-f", "--follow", action="store_true", help="stream new lines")


def add_tokens(verbs: Verbs) -> None:
    parser = verbs.add("token", None, "Create, list or revoke API tokens (needs an admin token).")
    sub = Verbs(parser, verbs.common)
    create = sub.add(
        "create",
        tokens.create,
        "Create a token and print its secret, once, as the last line.",
        "read: look; write: also start, stop, register; admin: also services and tokens.",
    )
    create.add_argument("--name", required=True, help="a unique name, e.g. ci-deploy")
    create.add_argument("--scope", choices=("read", "write", "admin"), default="read")
    create.add_argument("--tenant", metavar="ID", type=label, help="limit it to one tenant id")
    create.add_argument("--expires", metavar="DAYS", type=float, help="expire after DAYS")
    sub.add("list", tokens.list_, "List tokens (never their secrets).")
    revoke = sub.add("revoke", tokens.revoke, "Revoke a token: it is refused from now on.")
    revoke.add_argument("name", metavar="NAME")


def add_project(verbs: Verbs) -> None:
    init = verbs.add(
        "init",
        project.init,
        "Write a starter tenement.toml in the current directory.",
        "The service is named after the directory (or --name); the command is guessed\n"
        "from the files here (or --command).",
    )
    init.add_argument("--name", help="service name (default: the directory's name)")
    init.add_argument("--command", help="command to run (default: guessed)")
    gen = verbs.add(
        "token-gen",
        project.token_gen,
        "Make an API token on the server's host, in its database (upstream's verb).",
        "Admin by default, saved to {data_dir}/api_token (0600), which this CLI reads when\n"
        "no --token or TENEMENT_TOKEN is given. --tenant ID makes a write token limited to\n"
        "that tenant, printed only. Needs the data dir (--data-dir) of a server that ran.",
    )
    gen.add_argument("--tenant", metavar="ID", type=label, help="limit it to one tenant id")
    gen.add_argument("--description", help="a note stored in the token's name")


def add_config(verbs: Verbs) -> None:
    parser = verbs.add(
        "config",
        project.show,
        "Show the nearest tenement.toml (or one FILE), or `config check FILE`.",
        "Without a sub-verb: its data dir and services, as upstream's `ten config`.",
    )
    parser.add_argument("--file", metavar="FILE", help="this file instead of the nearest one")
    check = Verbs(parser, verbs.common, required=False, dest="config_verb").add(
        "check",
        configcheck.check,
        "Check a tenement.toml's structure, key names and value types, offline.",
        "Reports unknown keys (with a did-you-mean), wrong types, bad ids and [instances]\n"
        "naming undefined services, as `FILE: key: problem` lines, and exits 1.\n"
        "It does not expand placeholders, look commands up or measure socket paths: the\n"
        "server's `manage.py loadconfig --check FILE` is the full check.",
    )
    check.add_argument("file", metavar="FILE")


def add_upstream_traffic(verbs: Verbs) -> None:
    """Upstream's verbs: instances of a service as versions on {service}.{domain}."""
    weight = verbs.add(
        "weight",
        releases.weight,
        "Set an instance's traffic weight (0-100) on its service's weighted host.",
        "Requests to SERVICE.DOMAIN go to its instances in proportion to their weights;\n"
        "weight 0 gets none. Needs a write token (a tenant token: its own instance).",
    )
    weight.add_argument("instance", metavar="SVC:ID", type=instance_key)
    weight.add_argument("weight", metavar="WEIGHT", type=releases.percent)
    deploy = verbs.add(
        "deploy",
        releases.deploy,
        "Deploy a new version (SVC:VERSION) and wait for it to be healthy.",
        "Registers and starts SVC:VERSION with --weight, and waits up to --timeout seconds\n"
        "(default 30) for it to be healthy; if it is not, it is stopped with weight 0.",
    )
    deploy.add_argument("instance", metavar="SVC:VERSION", type=instance_key)
    deploy.add_argument("--weight", "-w", type=releases.percent, default=100)
    route = verbs.add(
        "route",
        releases.route,
        "Swap traffic from one version to another: FROM gets weight 0, TO gets 100.",
    )
    route.add_argument("service", metavar="SVC", type=label)
    route.add_argument("--from", dest="source", metavar="VERSION", type=label, required=True)
    route.add_argument("--to", dest="dest", metavar="VERSION", type=label, required=True)


def add_releases(verbs: Verbs) -> None:
    add_upstream_traffic(verbs)
    parser = verbs.add(
        "release",
        None,
        "Releases of a multi-tenant service: canary weights, pins, blue-green switches.",
    )
    sub = Verbs(parser, verbs.common)
    listing = sub.add("list", releases.list_, "List releases: weight, share, tenants on each.")
    listing.add_argument("service", metavar="SVC", type=label)
    create = sub.add(
        "create",
        releases.create,
        "Create a release: overrides on top of the service's definition.",
        "Needs an admin token. The first release made also records the service's own\n"
        "definition as release v1. With --smoke TENANT, one tenant is started on the new\n"
        "release first; if it is not healthy the release is failed with weight 0 (exit 7).",
    )
    create.add_argument("service", metavar="SVC", type=label)
    create.add_argument("name", metavar="NAME", type=label)
    create.add_argument("--command", help="the command (default: the service's)")
    create.add_argument("--arg", action="append", metavar="A", help="one argument (repeat)")
    create.add_argument(
        "--env", action="append", metavar="K=V", type=releases.env_pair, help="repeat"
    )
    create.add_argument("--health", metavar="PATH", help="health path (default: the service's)")
    create.add_argument("--weight", type=releases.percent, default=0)
    create.add_argument("--smoke", metavar="TENANT", type=label)
    create.add_argument("--smoke-timeout", metavar="S", type=positive, default=30.0)
    weight = sub.add("weight", releases.set_weight, "Set a release's canary weight (0-100).")
    weight.add_argument("service", metavar="SVC", type=label)
    weight.add_argument("name", metavar="NAME", type=label)
    weight.add_argument("weight", metavar="WEIGHT", type=releases.percent)
    for name, run, summary in (
        ("switch", releases.switch, "Blue-green: this release gets 100, the others 0."),
        ("retire", releases.retire, "Retire a release with weight 0 and no pinned tenants."),
    ):
        action = sub.add(name, run, summary)
        action.add_argument("service", metavar="SVC", type=label)
        action.add_argument("name", metavar="NAME", type=label)
    rollback = sub.add("rollback", releases.rollback, "Switch back to the release before.")
    rollback.add_argument("service", metavar="SVC", type=label)
    pin = sub.add("pin", releases.pin, "Pin a tenant to a release (no NAME: unpin).", "Pins win.")
    pin.add_argument("instance", metavar="SVC:ID", type=instance_key)
    pin.add_argument("name", metavar="NAME", nargs="?", type=label)
    changes = sub.add("changes", releases.changes, "The audit trail: who changed what.")
    changes.add_argument("service", metavar="SVC", nargs="?", type=label)


def add_tls(verbs: Verbs) -> None:
    tls.add_verbs(verbs, instance_key)


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="ten",
        description=DESCRIPTION,
        epilog=EPILOG,
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = Verbs(parser, common)
    parser.add_argument("--version", "-V", action="version", version=f"ten {version()}")
    for add in (
        add_lifecycle,
        add_status,
        add_logs,
        add_tokens,
        add_project,
        add_config,
        add_releases,
        add_tls,
    ):
        add(verbs)
    proxyconf.add(verbs)
    install.add(verbs)
    return parser


def version() -> str:
    """tenement-django's version (the upstream `ten` this replaces printed its own)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return f"{installed('tenement-django')} (tenement on Django)"
    except PackageNotFoundError:
        return "unknown (tenement on Django, not installed)"


def resolve_defaults(args: argparse.Namespace) -> None:
    args.server = (
        getattr(args, "server", None) or os.environ.get("TENEMENT_SERVER") or DEFAULT_SERVER
    )
    args.data_dir = getattr(args, "data_dir", None)
    args.token = getattr(args, "token", None) or os.environ.get("TENEMENT_TOKEN") or None
    if args.token is None and args.verb not in LOCAL_VERBS:
        args.token = project.token_from_file(args)
    args.json = getattr(args, "json", False)
    args.timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    resolve_defaults(args)
    try:
        return int(args.run(args))
    except CliError as e:
        print(f"ten: {e}", file=sys.stderr)
        return int(e.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ten ps | head`): stop quietly, and keep Python's exit flush
        # from failing on the dead pipe too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.FAILED
