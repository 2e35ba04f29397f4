"""Releases in the supervisor: which release each tenant runs, and moving it.

One process per tenant at a time: a tenant whose release changes while it runs is
stopped (its WebSockets get 1012, in-flight requests finish within stop_timeout) and
started again on the new release; requests arriving meanwhile are held by the wake.
A sleeping tenant simply wakes on its new release. A start that fails on a release goes
back to the release the tenant last ran healthy on (an event and a metric), and the
tenant stays there until an operator changes that release.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from instances import metrics
from instances.spec import ServiceSpec
from instances.supervisor import store
from instances.supervisor.runtime import Runtime, State
from routing.releases import ReleaseInfo, base_name, bucket, effective

if TYPE_CHECKING:
    from instances.supervisor.core import Supervisor

log = logging.getLogger("tenement.supervisor")


class Releases:
    """Supervisor mixin: the release table and the moves it asks for."""

    def apply_releases(self: Supervisor, loaded: dict[str, tuple[ReleaseInfo, ...]]) -> bool:
        """Take the database's releases; returns whether any service's changed."""
        if loaded == self.releases:
            return False
        self.releases = loaded
        return True

    def release_info(self: Supervisor, service: str, name: str) -> ReleaseInfo | None:
        return next((r for r in self.releases.get(service, ()) if r.name == name), None)

    def target_release(self: Supervisor, rt: Runtime) -> str:
        """The release `rt` should run now ("" when its service has none)."""
        found: Sequence[ReleaseInfo] = self.releases.get(rt.key.service, ())
        versions = {r.name: r.version for r in found}
        skip = [name for name, version in rt.skip.items() if versions.get(name) == version]
        name = effective(found, bucket(*rt.key), pin=rt.pin, last_good=rt.last_good, skip=skip)
        return name or base_name(found)

    def on_release(self: Supervisor, rt: Runtime, name: str) -> bool:
        """Whether its process runs `name` (one started before any release existed runs
        the service's definition, which is the first release)."""
        return (rt.release or base_name(self.releases.get(rt.key.service, ()))) == name

    def release_spec(self: Supervisor, rt: Runtime, name: str) -> ServiceSpec:
        info = self.release_info(rt.key.service, name)
        return info.apply(rt.spec) if info is not None else rt.spec

    def move_releases(self: Supervisor) -> bool:
        """Stop running tenants whose release changed; the reconcile starts them again."""
        moved = False
        for rt in list(self.awake.values()):  # only running ones can need a move
            if rt.state != State.RUNNING or rt.stopping is not None or rt.stop_in_flight:
                continue
            target = self.target_release(rt)
            if self.on_release(rt, target):
                continue
            log.info(
                "%s moves from release %s to %s",
                rt.key,
                rt.release or "(definition)",
                target,
                extra={"event": "release_move", "instance": rt.key, "to": target},
            )
            self.outbox.put(
                "release move",
                store.record_event,
                rt.pk,
                "release",
                f"moving from release {rt.release or '(definition)'} to {target}",
            )
            self.request_stop(rt, "release")
            moved = True
        return moved

    def fall_back(self: Supervisor, rt: Runtime, reason: str) -> bool:
        """A start on a release failed: go back to the tenant's last healthy release at
        once, rather than back off and retry the broken one. False if there is nowhere
        else to go (the failure then takes the usual restart policy)."""
        if rt.state != State.STARTING or not rt.release:
            return False
        info = self.release_info(rt.key.service, rt.release)
        if info is None:
            return False
        rt.skip[rt.release] = info.version
        target = self.target_release(rt)
        if target == rt.release or not target:
            del rt.skip[rt.release]
            return False
        message = f"release {rt.release} failed to start ({reason}); falling back to {target}"
        log.warning(
            "%s: %s",
            rt.key,
            message,
            extra={"event": "release_fallback", "instance": rt.key, "release": rt.release},
        )
        metrics.release_fallback(rt.key.service, rt.release)
        self.outbox.put(
            "release fallback",
            store.release_fallback,
            rt.pk,
            rt.key.service,
            rt.release,
            target,
            message,
        )
        self.set_state(rt, State.STOPPED, "fallback", message, pid=None, pid_create_time=None)
        return True

    def healthy_on_release(self: Supervisor, rt: Runtime) -> None:
        """It became ready: this release is where a later failed start falls back to."""
        name = rt.release or base_name(self.releases.get(rt.key.service, ()))
        if name and name != rt.last_good:
            rt.last_good = name
            self.outbox.put("last release", store.update, rt.pk, last_release=name)
