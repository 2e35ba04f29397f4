"""Human output: aligned tables, durations like 3m12s, sizes like 21.5 MiB; or the API's JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB")


def duration(seconds: float | None) -> str:
    """Two units at most: a glance at `ps` needs the order of magnitude, not the exact value."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in SIZE_UNITS:
        value /= 1024
        if value < 1024 or unit == SIZE_UNITS[-1]:
            break
    return f"{value:.1f} {unit}"


def parse_time(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)  # the API speaks UTC


def ago(iso: str | None) -> str:
    when = parse_time(iso)
    if when is None:
        return "-"
    return duration((datetime.now(UTC) - when).total_seconds()) + " ago"


def local_time(iso: str | None) -> str:
    """The operator's local time, to the second, as journalctl and tail show it."""
    when = parse_time(iso)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else (iso or "-")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    # rstrip: no trailing blanks after the last column, for scripts that split lines.
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def note(message: str) -> None:
    """A human remark on stderr, so stdout stays what a script would capture."""
    print(message, file=sys.stderr)
