"""A server's own books for metrics: counted where the events happen, read once a second.

Rules this module keeps:

* The hot path only adds to plain attributes of one ``Counters`` object (``__slots__``): the
  transports (bytes in and out, always: a few instructions) and load shedding; with
  --metrics-bind, a request hook at each request's end (status class, duration bucket) (``ServerState.request_timeouts`` counts
  request timeouts, the WSGI adapter's ``shed`` its own 503s). Gauges (requests in
  flight, connections, WebSockets) are not counted at all: they are read off the connection
  registry when a heartbeat is written.
* ``fields()`` turns the books into the heartbeat's ``key=value`` fields (``supervisor.channel``):
  the supervisor sums the counter fields (``COUNTER_FIELDS``) over every worker, past and
  present, and ``uvworker.exporter`` turns them into Prometheus metrics. The one-process server
  reads the same fields from itself, so both shapes report through one path.

No import of prometheus_client here: workers never need it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

# uvworker_request_duration_seconds buckets (upper bounds, seconds; +Inf is implied).
# ``le`` is inclusive: a duration goes to the first bound it does not exceed (bisect_left).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Heartbeat fields. Counters only grow in a worker's life; the supervisor keeps the last values
# of the workers that exited so that fleet totals never go backwards.
CODES = "codes"  # responses by status class: 0 (none sent), 1xx, ..., 5xx
DURATIONS = "dur"  # requests per duration bucket (not cumulative), then +Inf
DURATION_SUM = "dsum"  # seconds
SHED = "shed"  # 503s from load shedding (--limit-concurrency, --wsgi-queue)
TIMEOUTS = "tmo"  # requests ended by --timeout-request
RECEIVED = "rx"  # bytes
SENT = "tx"  # bytes
COUNTER_FIELDS = (CODES, DURATIONS, DURATION_SUM, SHED, TIMEOUTS, RECEIVED, SENT)
# Gauges: the worker's present.
IN_FLIGHT = "fly"
CONNECTIONS = "conn"
WEBSOCKETS = "ws"
LOOP_LAG = "lag"  # seconds: the longest a loop tick was late since the last heartbeat


class Counters:
    __slots__ = ("codes", "durations", "duration_sum", "shed", "received", "sent", "lag")

    def __init__(self) -> None:
        self.codes = [0] * 6
        self.durations = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self.shed = 0  # the WSGI adapter counts its own (its ``shed``)
        self.received = 0
        self.sent = 0
        self.lag = 0.0

    def request_done(self, record: Any) -> None:
        """A request hook (``ServerState.request_hooks``, added with --metrics-bind)."""
        status = record.status
        self.codes[status // 100] += 1
        if status != 101:  # a WebSocket session's length is not a request's duration
            duration = time.perf_counter() - record.start_clock
            self.durations[bisect_left(BUCKETS, duration)] += 1
            self.duration_sum += duration

    def fields(self, in_flight: int, connections: int, websockets: int, timeouts: int, shed: int) -> dict[str, str]:
        """The heartbeat fields, with the gauges and the counts kept elsewhere
        (``ServerState.metrics_fields``); the loop lag restarts from zero for the next interval."""
        lag, self.lag = self.lag, 0.0
        return {
            CODES: _join(self.codes),
            DURATIONS: _join(self.durations),
            DURATION_SUM: f"{self.duration_sum:.6f}",
            SHED: str(self.shed + shed),
            TIMEOUTS: str(timeouts),
            RECEIVED: str(self.received),
            SENT: str(self.sent),
            IN_FLIGHT: str(in_flight),
            CONNECTIONS: str(connections),
            WEBSOCKETS: str(websockets),
            LOOP_LAG: f"{lag:.6f}",
        }


def _join(values: list[int]) -> str:
    return ",".join(map(str, values))
