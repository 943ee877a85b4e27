"""A circuit breaker for calls to an external archive.

A dead or hanging PACS must not tie up the web workers: after ``failures`` failed calls in a
row the breaker opens and every call fails at once (the viewer shows "temporarily unavailable"
with a 503) until ``reset_after`` seconds have passed; then one trial call is let through
(half open). Its success closes the breaker, its failure opens it again.

The state lives in the process: each web worker learns on its own that the archive is down,
which costs each of them at most ``failures`` bounded timeouts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from portal import failures

State = Literal["closed", "open", "half_open"]


class BreakerOpen(failures.Unavailable):
    """The breaker is open: the call was not attempted."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"circuit open; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass
class BreakerStatus:
    """What ``/readyz`` shows: the state, failures in a row, and the last failure's kind."""

    state: State
    consecutive_failures: int
    last_failure: str
    retry_after: float


class CircuitBreaker:
    """Closed -> (``failures`` in a row) -> open -> (``reset_after`` s) -> half open -> ..."""

    def __init__(self, failures: int, reset_after: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[State], None] | None = None) -> None:
        self.failures = failures
        self._on_change = on_change  # told each new state (metrics: portal/metrics.py)
        self._told: State = "closed"
        self.reset_after = reset_after
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self._last_failure = ""

    def _state(self, now: float) -> State:
        if self._opened_at is None:
            return "closed"
        if now - self._opened_at >= self.reset_after:
            return "half_open"
        return "open"

    def before_call(self) -> None:
        """Raise ``BreakerOpen`` unless a call may go ahead now."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            if state == "closed":
                return
            if state == "half_open" and not self._trial_running:
                self._trial_running = True
                self._tell("half_open")
                return
            assert self._opened_at is not None
            raise BreakerOpen(max(1.0, self.reset_after - (now - self._opened_at)))

    def succeeded(self) -> None:
        """The call worked: close the breaker."""
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._trial_running = False
            self._tell("closed")

    def failed(self, kind: str) -> None:
        """The call failed (network error, timeout, 5xx): count it, open when too many."""
        with self._lock:
            self._consecutive += 1
            self._last_failure = kind
            if self._trial_running or self._consecutive >= self.failures:
                self._opened_at = self._clock()
                self._tell("open")
            self._trial_running = False

    def _tell(self, state: State) -> None:
        """Under the lock: report a change of state (a breaker's calls are not hot enough
        for the few microseconds a metric costs to matter)."""
        if state != self._told:
            self._told = state
            if self._on_change is not None:
                self._on_change(state)

    def status(self) -> BreakerStatus:
        """The current state, for health checks and logs."""
        with self._lock:
            now = self._clock()
            state = self._state(now)
            retry = 0.0 if self._opened_at is None else max(
                0.0, self.reset_after - (now - self._opened_at))
            return BreakerStatus(state, self._consecutive, self._last_failure, retry)
