"""Restart policy: exponential backoff with jitter, and the crash-loop breaker."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# Up to this fraction of each delay is randomly shaved off, so tenants that
# crashed together (a bad deploy, a shared dependency down) do not retry in lockstep.
JITTER = 0.2


def backoff_delay(
    attempt: int, base_ms: int, max_ms: int, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before restart number `attempt` (0-based): base·2^n, capped, jittered."""
    capped = min(max_ms, base_ms * 2 ** min(attempt, 32))
    return capped * (1 - JITTER * rand()) / 1000


@dataclass
class RestartPolicy:
    """Counts restarts in a sliding window; more than max_restarts means 'failed'."""

    max_restarts: int
    window: float
    base_ms: int
    max_ms: int
    rand: Callable[[], float] = random.random
    history: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float) -> float | None:
        """Record a crash at `now`. Return the delay before restarting, or None to give up."""
        while self.history and now - self.history[0] > self.window:
            self.history.popleft()
        if len(self.history) >= self.max_restarts:
            return None
        delay = backoff_delay(len(self.history), self.base_ms, self.max_ms, self.rand)
        self.history.append(now)
        return delay

    def reset(self) -> None:
        self.history.clear()
