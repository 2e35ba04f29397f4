"""Which release a tenant runs, and which instance a weighted host request goes to.

Pure functions: no database, no I/O. The supervisor decides releases (it owns the
processes); the proxy picks instances for `{service}.{domain}` (per request).

Tenant-sticky split: each tenant hashes to a stable bucket 0-99. Releases are laid over
the buckets newest first, each taking as many buckets as its weight (clipped at 100);
buckets no release covers go to the oldest release with a weight. So raising a release's
weight only moves tenants from older releases onto newer ones, never back, and a weight
of 0 covers no bucket at all.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from instances.spec import ServiceSpec

BUCKETS = 100
ACTIVE, DRAINING, RETIRED, FAILED = "active", "draining", "retired", "failed"
# A tenant may run on these (a pin or a fallback); only active ones get buckets.
RUNNABLE = frozenset({ACTIVE, DRAINING})


@dataclass(frozen=True)
class ReleaseInfo:
    """A release as the supervisor and the split see it (oldest first in a service)."""

    name: str
    weight: int = 0
    state: str = ACTIVE
    command: str = ""
    args: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()
    health: str = ""
    # Changes whenever an operator touches the release: a tenant's failed start on it
    # is only remembered while the release is unchanged.
    version: str = ""

    def apply(self, spec: ServiceSpec) -> ServiceSpec:
        """The service's spec with this release's overrides on top."""
        if self.args is not None:
            command, args = self.command or spec.command, self.args
        elif self.command:
            command, args = self.command, ()  # a command of its own is split as written
        else:
            command, args = spec.command, spec.args
        env = tuple(sorted({**dict(spec.env), **dict(self.env)}.items()))
        return replace(spec, command=command, args=args, env=env, health=self.health or spec.health)


def bucket(service: str, instance_id: str) -> int:
    """A tenant's stable bucket 0-99 (the same in every process and across restarts)."""
    digest = hashlib.sha256(f"{service}:{instance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def ranges(releases: Sequence[ReleaseInfo]) -> list[tuple[str, int, int]]:
    """(name, first bucket, end bucket) of each release that covers any, newest first."""
    weighted = [r for r in releases if r.state == ACTIVE and r.weight > 0]
    out: list[tuple[str, int, int]] = []
    start = 0
    for release in reversed(weighted):
        end = min(BUCKETS, start + release.weight)
        if end > start:
            out.append((release.name, start, end))
        start = end
    if out and start < BUCKETS:
        # Weights summing under 100: the rest stays on the oldest weighted release.
        name, first, _ = out[-1]
        out[-1] = (name, first, BUCKETS)
    return out


def split(releases: Sequence[ReleaseInfo], point: int) -> str:
    """The release covering bucket `point`, or "" when no release has a weight."""
    for name, first, end in ranges(releases):
        if first <= point < end:
            return name
    return ""


def shares(releases: Sequence[ReleaseInfo]) -> dict[str, int]:
    """Buckets (percent of tenants) each release gets from the split; pins aside."""
    out = dict.fromkeys((r.name for r in releases), 0)
    for name, first, end in ranges(releases):
        out[name] = end - first
    return out


def effective(
    releases: Sequence[ReleaseInfo],
    point: int,
    *,
    pin: str = "",
    last_good: str = "",
    skip: Iterable[str] = (),
) -> str:
    """The release a tenant in bucket `point` runs.

    A pin wins while its release can run. Releases in `skip` failed to start for this
    tenant: it goes back to the release it last ran healthy on, else to the split over
    what is left. "" means the service's own definition (it has no releases).
    """
    skipped = set(skip)
    runnable = {r.name for r in releases if r.state in RUNNABLE and r.name not in skipped}
    if pin and pin in runnable:
        return pin
    chosen = split(releases, point)
    if chosen and chosen not in skipped:
        return chosen
    if last_good in runnable:
        return last_good
    return split([r for r in releases if r.name not in skipped], point)


def base_name(releases: Sequence[ReleaseInfo]) -> str:
    """The first release: the service's own definition, as it was before releases."""
    return releases[0].name if releases else ""


# ---- weighted service hosts ({service}.{domain}, upstream's shape) ------------------------


def pick(candidates: Sequence[tuple[str, int]], rng: random.Random | None = None) -> str | None:
    """An instance id chosen in proportion to its weight; weight 0 never; None if none."""
    ids = [i for i, w in candidates if w > 0]
    if not ids:
        return None
    weights = [w for _, w in candidates if w > 0]
    return (rng or random).choices(ids, weights)[0]
