"""A worker's request budget (``--max-requests``): when to ask for a replacement, when to stop.

Rules this module keeps
-----------------------
1. Exact once handed over. After the master's handover (``HANDOVER_SIGNAL``: "your
   replacement is ready") the worker stops accepting the moment it has served its limit, so it
   serves at most the limit plus what its connections already have in flight.
2. Capacity first until then. Without a handover the worker keeps serving past its limit:
   a replacement that is slow, or that fails to start (a broken deploy), never leaves the
   fleet one worker short. The master hands over as soon as the replacement is ready.
3. Ask early enough. The worker asks for its replacement (``nearing``) when it could reach its
   limit within ``lead`` seconds: three times the time a worker takes to boot (its own boot,
   or the fleet's recent ones, whichever is longer) plus a margin, at twice the highest
   request rate it has seen — from the start, the highest rate of the fleet's recent workers,
   so a budget shorter than the measuring window is asked for at its first request, not at
   its end (an idle worker asks for nothing). Rates jump (a neighbour retires and its
   clients reconnect here, a CPU-starved worker catches up), and asking early only costs an
   extra worker for a moment, while asking late costs the budget.
4. No I/O and no clock: the caller passes the count and the time, and acts on the answer.
   Between checks the caller only compares its count with ``check_at``.
"""

from __future__ import annotations

import math

NEARING = "nearing"  # ask the master to start the replacement now
EXHAUSTED = "exhausted"  # stop accepting now (handed over and at the limit)

LEAD_FACTOR = 3.0
LEAD_MARGIN = 0.2  # seconds: the master's turn, the fork, the ready message, the handover
RATE_HEADROOM = 2.0  # the rate to plan for, as a multiple of the highest one seen
MIN_WINDOW = 0.05  # seconds: a shorter stretch of requests says too little about the rate


def lead_time(own_boot: float, fleet_boot: float = 0.0) -> float:
    """Seconds before the limit at which to ask for the replacement."""
    return LEAD_FACTOR * max(own_boot, fleet_boot, 0.0) + LEAD_MARGIN


class RequestBudget:
    def __init__(self, limit: int, lead: float, now: float, rate: float = 0.0) -> None:
        self.limit = limit
        self.lead = lead
        self.asked = False
        self.handed_over = False
        # Requests per second: the highest measured over MIN_WINDOW or more (or the fleet's).
        self.rate = max(0.0, rate)
        # Seconds to the limit at RATE_HEADROOM times that rate.
        self.eta = limit / (RATE_HEADROOM * self.rate) if self.rate else math.inf
        # The rate is measured from the first request on: a new worker often waits a while
        # for its first connections, and that wait says nothing about how fast it will go.
        self._mark: tuple[int, float] | None = None
        self.check_at: float = 1

    def update(self, served: int, now: float) -> str | None:
        """``served`` requests by ``now``; returns NEARING, EXHAUSTED or None."""
        self._measure(served, now)
        if not served:
            return None  # an idle worker asks for nothing, whatever rate the fleet had
        if served >= self.limit:
            self.check_at = math.inf  # nothing more to decide here: the handover decides
            if self.handed_over:
                return EXHAUSTED
            if not self.asked:
                self.asked = True
                return NEARING
            return None
        if self.asked:
            self.check_at = self.limit
            return None
        # Ask now if the next check would already be too late: never late, at most a step early.
        self.check_at = self._step(served)
        if self.rate and (self.limit - self.check_at) / (RATE_HEADROOM * self.rate) <= self.lead:
            self.asked = True
            self.check_at = self.limit
            return NEARING
        return None

    def hand_over(self, served: int) -> str | None:
        """The replacement is ready: from now on the limit is exact."""
        self.handed_over = True
        if served >= self.limit:
            self.check_at = math.inf
            return EXHAUSTED
        self.check_at = self.limit
        return None

    def _step(self, served: int) -> int:
        # Look again after an eighth of what remains: finer as the limit nears.
        return served + max(1, (self.limit - served) // 8)

    def _measure(self, served: int, now: float) -> None:
        if self._mark is None:
            if served:
                self._mark = (served, now)
            return
        count, since = self._mark
        elapsed = now - since
        if elapsed < MIN_WINDOW:
            return  # the window stays open until it is long enough
        self.rate = max(self.rate, (served - count) / elapsed)
        self._mark = (served, now)
        if self.rate:
            self.eta = (self.limit - served) / (RATE_HEADROOM * self.rate)
