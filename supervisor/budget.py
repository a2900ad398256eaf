"""A worker's budget (``--max-requests``, ``--max-lifetime``): when to ask for a replacement,
when to stop accepting, when to leave.

Rules this module keeps
-----------------------
1. The limit is hard. At its limit (requests served, or the end of its lifetime) the worker
   stops accepting, whether or not its replacement is ready: it serves at most the limit plus
   one request per connection it has open (the one in flight, or the next one, answered with
   ``Connection: close``).
2. It leaves only onto a replacement. Handed over (``HANDOVER_SIGNAL``: its replacement is
   ready), the worker leaves at its limit (EXHAUSTED). Not handed over yet, it HOLDs: it
   accepts nothing, its connections get their last answers, and the process waits — for the
   master to retire it (the replacement is ready: a brief dip in accepting workers, the
   clients' new connections wait in the listen backlog) or to say ``serve_on``
   (``SERVE_ON_SIGNAL``: the replacement could not start), and then it accepts again
   (RESUME) and serves until a replacement is ready. A broken deploy on disk must never take
   the fleet to zero; that is the one case a worker serves past its limit.
3. Ask early enough, so that holding is the exception. The worker asks for its replacement
   (NEARING) when it could reach its limit within ``lead`` seconds: three times the time a
   worker takes to boot (its own boot, or the fleet's recent ones, whichever is longer) plus a
   margin, at twice the highest request rate it has seen — from the start, the highest rate
   of the fleet's recent workers, so a budget shorter than the measuring window is asked for
   at its first request, not at its end (an idle worker asks for nothing). Rates jump (a
   neighbour retires and its clients reconnect here, a CPU-starved worker catches up), and
   asking early only costs an extra worker for a moment, while asking late costs a dip. The
   lifetime is known: the master asks for that replacement itself.
4. No I/O and no clock: the caller passes the count and the time, and acts on the answer.
   Between checks the caller only compares its count with ``check_at``.

Worker states (``Budget.stage``)::

    SERVING --limit, handed over--------> LEAVING   (EXHAUSTED: retire, exit when drained)
    SERVING --limit, not handed over----> HOLDING   (HOLD: stop accepting, say "holding")
    SERVING --limit, told to serve on---> SERVING   (capacity first: a replacement failed)
    HOLDING --handover------------------> LEAVING   (EXHAUSTED; the master usually retires it)
    HOLDING --serve_on------------------> SERVING   (RESUME: accept again)
"""

from __future__ import annotations

import math

NEARING = "nearing"  # ask the master to start the replacement now
HOLD = "hold"  # at the limit, no replacement ready: stop accepting, say "holding", stay
RESUME = "resume"  # the replacement failed (serve_on): accept again
EXHAUSTED = "exhausted"  # at the limit and handed over: stop accepting and leave

SERVING = "serving"
HOLDING = "holding"
LEAVING = "leaving"

MAX_REQUESTS = "max_requests"  # why the budget is spent (the channel's reason field)
MAX_LIFETIME = "max_lifetime"

LEAD_FACTOR = 3.0
LEAD_MARGIN = 0.2  # seconds: the master's turn, the fork, the ready message, the handover
RATE_HEADROOM = 2.0  # the rate to plan for, as a multiple of the highest one seen
MIN_WINDOW = 0.05  # seconds: a shorter stretch of requests says too little about the rate


def lead_time(own_boot: float, fleet_boot: float = 0.0) -> float:
    """Seconds before the limit at which to ask for the replacement."""
    return LEAD_FACTOR * max(own_boot, fleet_boot, 0.0) + LEAD_MARGIN


class Budget:
    """``limit`` requests (0: none); the lifetime's end is reported with ``expire``."""

    def __init__(self, limit: int, lead: float, now: float, rate: float = 0.0) -> None:
        self.limit = limit
        self.lead = lead
        self.stage = SERVING
        self.spent: str | None = None  # MAX_REQUESTS or MAX_LIFETIME, once reached
        self.asked = False
        self.handed_over = False
        self.serving_on = False  # told serve_on: a replacement failed; serve until one is ready
        # Requests per second: the highest measured over MIN_WINDOW or more (or the fleet's).
        self.rate = max(0.0, rate)
        # Seconds to the limit at RATE_HEADROOM times that rate.
        self.eta = limit / (RATE_HEADROOM * self.rate) if self.rate and limit else math.inf
        # The rate is measured from the first request on: a new worker often waits a while
        # for its first connections, and that wait says nothing about how fast it will go.
        self._mark: tuple[int, float] | None = None
        self.check_at: float = 1 if limit else math.inf

    def update(self, served: int, now: float) -> str | None:
        """``served`` requests by ``now``; returns NEARING, HOLD, EXHAUSTED or None."""
        self._measure(served, now)
        if not served or not self.limit:
            return None  # an idle worker asks for nothing, whatever rate the fleet had
        if served >= self.limit:
            self.check_at = math.inf  # nothing more to count: the master decides the rest
            self.asked = True  # "holding" asks too, if "nearing" never went
            return self._spend(MAX_REQUESTS)
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

    def expire(self) -> str | None:
        """The lifetime is over: HOLD, EXHAUSTED or None (serving on, or spent already)."""
        return self._spend(MAX_LIFETIME)

    def hand_over(self, served: int) -> str | None:
        """The replacement is ready: EXHAUSTED if the limit is reached, else stop at it."""
        self.handed_over = True
        if self.stage is LEAVING:
            return None
        if self.spent is None and self.limit and served >= self.limit:
            self.spent = MAX_REQUESTS
        if self.spent is not None:
            self.stage = LEAVING
            self.check_at = math.inf
            return EXHAUSTED
        self.check_at = self.limit or math.inf
        return None

    def serve_on(self) -> str | None:
        """The replacement could not start: RESUME if holding; until the next handover, the
        limit no longer stops this worker (capacity first)."""
        self.serving_on = True
        if self.stage is HOLDING:
            self.stage = SERVING
            return RESUME
        return None

    def _spend(self, reason: str) -> str | None:
        if self.spent is None:
            self.spent = reason
        if self.stage is not SERVING:
            return None
        if self.handed_over:
            self.stage = LEAVING
            return EXHAUSTED
        if self.serving_on:
            return None
        self.stage = HOLDING
        return HOLD

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
        if self.rate and self.limit:
            self.eta = max(0.0, self.limit - served) / (RATE_HEADROOM * self.rate)
