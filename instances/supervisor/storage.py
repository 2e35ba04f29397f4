"""storage_quota_mb: how much each running tenant keeps in its data dir, measured cheaply.

A walk of the folder every TENEMENT_STORAGE_CHECK_SECONDS (default 60) in a thread,
capped in entries so a tenant with millions of files cannot stall it. Crossing 80% and
100% of the quota is an event (dashboard, API) and a warning; nothing is deleted.
"""

from __future__ import annotations

import os
from pathlib import Path

# Past this many entries the walk stops and reports what it has ("at least").
MAX_ENTRIES = 200_000
LEVELS = (100, 80)


def measure(folder: Path, max_entries: int = MAX_ENTRIES) -> tuple[int, bool]:
    """Bytes allocated under folder (st_blocks, so sparse files count as stored) and
    whether the count is complete."""
    total, seen, stack = 0, 0, [str(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > max_entries:
                return total, False
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total, True


def level(used: int, quota_mb: int) -> int:
    """The highest threshold (percent) that `used` has reached: 100, 80 or 0."""
    percent = used * 100 / (quota_mb * 2**20)
    return next((mark for mark in LEVELS if percent >= mark), 0)
