"""The process supervisor. See core.Supervisor."""

from __future__ import annotations

from instances.supervisor.core import InstanceUnavailable, Supervisor

__all__ = ["InstanceUnavailable", "Supervisor"]
