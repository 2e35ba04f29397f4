"""logs: search captured output, or follow it live over Server-Sent Events."""

from __future__ import annotations

import json
from argparse import Namespace
from typing import Any

from instances.cli.client import Client, CliError, Exit, api_path, client_from
from instances.cli.output import local_time, print_json

SEARCH = api_path("logs", slash=False)
STREAM = api_path("logs", "stream", slash=False)
DEFAULT_LIMIT = 100
FOLLOW_BACKLOG = 10  # like tail -f: a little context, then new lines


def logs(args: Namespace) -> int:
    client = client_from(args)
    if args.follow:
        return follow(client, args)
    query = {
        "instance": args.instance,
        "stream": args.stream,
        "q": args.search,
        "since": args.since,
        "until": args.until,
        "limit": args.limit or DEFAULT_LIMIT,
        "order": args.order,
    }
    page = client.call("GET", SEARCH, query)
    if args.json:
        print_json(page)
        return Exit.OK
    # Newest-first pages read best oldest-first, as tail shows them; ranked ones best first.
    # Without --search or --order the server lists the newest lines oldest first already.
    for line in reversed(page) if args.order == "newest" else page:
        print(format_line(line))
    return Exit.OK


def follow(client: Client, args: Namespace) -> int:
    if args.search or args.since or args.until:
        raise CliError("--search, --since and --until cannot be used with --follow", Exit.USAGE)
    try:
        last = print_backlog(client, args)
        # Resuming after the backlog's last id: nothing printed between the two is lost.
        with client.events(STREAM, where_of(args), last) as events:
            for line in events:
                if last is None or not isinstance(line.get("id"), int) or line["id"] > last:
                    show(line, args.json)
    except KeyboardInterrupt:
        return Exit.OK  # Ctrl-C is how following ends
    return Exit.OK


def where_of(args: Namespace) -> dict[str, str | None]:
    return {"instance": args.instance, "stream": args.stream}


def print_backlog(client: Client, args: Namespace) -> int | None:
    """The last few lines, oldest first, as tail -f starts; returns the newest line's id."""
    query = {**where_of(args), "limit": args.limit or FOLLOW_BACKLOG, "order": "newest"}
    backlog = client.call("GET", SEARCH, query)[::-1]
    for line in backlog:
        show(line, args.json)
    return max((line["id"] for line in backlog), default=None)


def show(line: dict[str, Any], as_json: bool) -> None:
    # flush: whoever reads a pipe should see each line as it arrives.
    print(json.dumps(line, ensure_ascii=False) if as_json else format_line(line), flush=True)


def format_line(line: dict[str, Any]) -> str:
    when, instance = local_time(line.get("time")), line.get("instance", "")
    return f"{when}  {instance}  {line.get('stream', ''):<6}  {line.get('text', '')}"
