"""The lifecycle's rules as pure functions: the reconcile decision and the table of legal
transitions (lifecycle.py)."""

from __future__ import annotations

import itertools

import pytest

from instances.ids import InstanceKey
from instances.spec import ServiceSpec
from instances.supervisor.backoff import RestartPolicy
from instances.supervisor.lifecycle import LEGAL, decide, restart_reason
from instances.supervisor.runtime import Desired, Runtime, State


def runtime(state: str, desired: str, **fields: object) -> Runtime:
    spec = ServiceSpec(name="app", command="true", data_dir="/nonexistent")
    rt = Runtime(pk=1, key=InstanceKey("app", "a"), spec=spec, policy=RestartPolicy(3, 60, 1, 2))
    rt.state, rt.desired = state, desired
    for name, value in fields.items():
        setattr(rt, name, value)
    return rt


def test_every_state_has_a_row_and_only_known_targets() -> None:
    assert set(LEGAL) == set(State.values)
    for targets in LEGAL.values():
        assert targets <= set(State.values)
    # The happy path of the design, and no way out of failed but a reset or a manual start.
    path = [State.STOPPED, State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED]
    assert all(b in LEGAL[a] for a, b in itertools.pairwise(path))
    assert LEGAL[State.FAILED] == {State.STOPPED, State.STARTING}


@pytest.mark.parametrize(
    ("state", "desired", "fields", "action"),
    [
        (State.STOPPED, Desired.RUNNING, {}, "start"),
        (State.STOPPED, Desired.STOPPED, {}, None),
        (State.RUNNING, Desired.STOPPED, {}, "stop"),
        (State.STARTING, Desired.STOPPED, {}, "stop"),
        (State.RUNNING, Desired.RUNNING, {"restart_pending": True}, "restart"),
        (State.RUNNING, Desired.RUNNING, {}, None),
        (State.BACKOFF, Desired.RUNNING, {"backoff_until": 10.0}, None),
        (State.BACKOFF, Desired.RUNNING, {"backoff_until": 1.0}, "start"),
        (State.BACKOFF, Desired.STOPPED, {}, "settle"),
        (State.FAILED, Desired.RUNNING, {}, None),
    ],
)
def test_decide(state: str, desired: str, fields: dict[str, object], action: str | None) -> None:
    assert decide(runtime(state, desired, **fields), now=5.0) == action


def test_restart_reasons() -> None:
    assert restart_reason("unhealthy: 3 consecutive health checks failed") == "health"
    assert restart_reason("oom: killed by the kernel") == "oom"
    assert restart_reason("crashed: exited with code 1") == "crash"
