from __future__ import annotations

import pytest

from instances.supervisor.backoff import JITTER, RestartPolicy, backoff_delay


def test_delay_doubles_and_caps() -> None:
    no_jitter = [backoff_delay(n, 1000, 60_000, rand=lambda: 0.0) for n in range(8)]
    assert no_jitter == [1, 2, 4, 8, 16, 32, 60, 60]


def test_jitter_only_shortens_by_at_most_the_jitter_fraction() -> None:
    assert backoff_delay(2, 1000, 60_000, rand=lambda: 1.0) == pytest.approx(4 * (1 - JITTER))
    assert backoff_delay(2, 1000, 60_000, rand=lambda: 0.5) == pytest.approx(4 * (1 - JITTER / 2))


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert backoff_delay(10_000, 1000, 60_000, rand=lambda: 0.0) == 60


def test_policy_gives_up_after_max_restarts_within_window() -> None:
    policy = RestartPolicy(
        max_restarts=3, window=300, base_ms=1000, max_ms=60_000, rand=lambda: 0.0
    )
    assert [policy.next_delay(t) for t in (0, 1, 3)] == [1, 2, 4]
    assert policy.next_delay(7) is None  # the 4th crash inside 300 s


def test_policy_forgets_restarts_older_than_the_window() -> None:
    policy = RestartPolicy(max_restarts=2, window=10, base_ms=100, max_ms=1000, rand=lambda: 0.0)
    assert policy.next_delay(0) == 0.1
    assert policy.next_delay(5) == 0.2
    # Healthy for a whole window: the count starts over, and so does the delay.
    assert policy.next_delay(16) == 0.1
    assert policy.next_delay(17) == 0.2
    assert policy.next_delay(18) is None


def test_reset_clears_history() -> None:
    policy = RestartPolicy(max_restarts=1, window=100, base_ms=100, max_ms=1000, rand=lambda: 0.0)
    policy.next_delay(0)
    assert policy.next_delay(1) is None
    policy.reset()
    assert policy.next_delay(2) == 0.1
