"""How the dashboard pages show figures."""

from __future__ import annotations


def human_seconds(seconds: float | None) -> str:
    """'2d 3h', '4m 10s', '12s'; an em dash when not running."""
    if seconds is None:
        return "—"
    left = int(seconds)
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
    return " ".join(parts[:2])
