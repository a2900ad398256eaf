"""The deadline sweep (uvworker.deadlines): every deadline is enforced at the same tick as a
sweep over every connection would enforce it, while a connection whose deadline is far off
is looked at once a horizon, not every tick. Driven with a fake clock and fake connections;
the last test runs it in a real server."""

from __future__ import annotations

import gc
import random
import select
import time
import weakref
from typing import Any

from tests.http_client import Conn, build_request, respond
from uvworker.deadlines import DeadlineSweep

TICK = 0.1
HORIZON = 2.0
DELAYS = (2.0, 3.5, 5.0, 10.0)  # every one at least HORIZON, as server.shortest_deadline makes it


class FakeConn:
    """A connection as the sweep sees it: a deadline (its reads counted) and check_deadline,
    which, like a real one, either ends the deadline or starts the next (a linger)."""

    def __init__(self, name: int, log: list[tuple[int, int]]) -> None:
        self.name = name
        self.log = log
        self._deadline = 0.0
        self.reads = 0
        self.expired = 0

    @property
    def deadline(self) -> float:
        self.reads += 1
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self._deadline = value

    def check_deadline(self, now: float) -> None:
        if now < self._deadline:
            return
        self.log.append((round(now / TICK), self.name))
        self.expired += 1
        self._deadline = now + HORIZON if self.expired % 2 else 0.0  # a timeout, then its linger


def naive(connections: set[FakeConn], now: float) -> None:
    """The sweep as it was: every connection, every tick."""
    for conn in list(connections):
        if conn.deadline:
            conn.check_deadline(now)


def simulate(sweep: Any, seed: int, ticks: int = 600, count: int = 60) -> list[tuple[int, int]]:
    """Connections that come and go and whose deadlines are set, cleared and extended at random
    moments between ticks (by the rule: set only ``delay`` ahead, or moved later); returns
    which connection's deadline was enforced at which tick (in no particular order within a
    tick: the connections are independent)."""
    rng = random.Random(seed)
    log: list[tuple[int, int]] = []
    everyone = [FakeConn(i, log) for i in range(count)]
    registry: set[FakeConn] = set()
    for tick in range(1, ticks + 1):
        for _ in range(rng.randrange(8)):
            conn = rng.choice(everyone)
            at = (tick - 1 + rng.random()) * TICK  # loop time of this change, since the last tick
            action = rng.random()
            if conn not in registry:
                if action < 0.5:
                    registry.add(conn)
                    conn.deadline = at + rng.choice(DELAYS)
            elif action < 0.1:
                registry.discard(conn)  # closed, or handed to another protocol
                conn.deadline = 0.0
            elif action < 0.5:
                conn.deadline = at + rng.choice(DELAYS)
            elif action < 0.7:
                conn.deadline = 0.0
            elif conn._deadline:
                conn.deadline = conn._deadline + rng.random()  # a body's rate allowance
        sweep(registry, tick * TICK)
    return sorted(log)


def test_each_deadline_is_enforced_at_the_tick_a_sweep_over_everything_would() -> None:
    for seed in range(20):
        expected = simulate(naive, seed)
        assert len(expected) > 50  # the simulation does make deadlines come
        assert simulate(DeadlineSweep(HORIZON).run, seed) == expected, seed


def test_a_horizon_of_zero_looks_at_everything_every_tick() -> None:
    assert simulate(DeadlineSweep(0.0).run, 1) == simulate(naive, 1)
    log: list[tuple[int, int]] = []
    conn = FakeConn(0, log)
    conn.deadline = 100.0
    sweep = DeadlineSweep(0.0)
    for tick in range(1, 11):
        sweep.run({conn}, tick * TICK)
    assert conn.reads >= 10


def test_a_connection_far_from_its_deadline_is_looked_at_once_a_horizon() -> None:
    log: list[tuple[int, int]] = []
    conns = {FakeConn(i, log) for i in range(1000)}
    for conn in conns:
        conn.deadline = 60.0
    sweep = DeadlineSweep(HORIZON)
    for tick in range(1, 101):  # 10 s of ticks
        sweep.run(conns, tick * TICK)
    assert not log
    # A look at a far deadline reads it once; 10 s / 2 s: 5 or 6 looks (every tick: 100).
    assert max(conn.reads for conn in conns) <= 10 / HORIZON + 1


def test_a_noted_connection_that_goes_is_freed_and_not_acted_on() -> None:
    log: list[tuple[int, int]] = []
    staying, leaving, handed_over = FakeConn(0, log), FakeConn(1, log), FakeConn(2, log)
    registry = {staying, leaving, handed_over}
    staying.deadline = leaving.deadline = handed_over.deadline = 1.0  # noted by the first (full) sweep
    sweep = DeadlineSweep(HORIZON)
    sweep.run(registry, 0.1)
    registry -= {leaving, handed_over}
    gone = weakref.ref(leaving)
    del leaving
    gc.disable()  # freed by its reference count alone: the sweep holds no strong reference
    try:
        assert gone() is None
    finally:
        gc.enable()
    for tick in range(2, 15):
        sweep.run(registry, tick * TICK)
    assert log == [(10, 0)]  # only the connection still registered, at its deadline


def test_staggered_idle_connections_each_close_at_their_own_keep_alive_timeout(serve: Any) -> None:
    # Horizon 2 s (the shortest timeout): between full sweeps, each connection's timeout comes
    # from the noted ones. Wide upper bound: the machine running the suite may be busy.
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=b"ok")

    settings = dict(timeout_keep_alive=2.0, timeout_request_header=10, timeout_request_body=10, timeout_send=10)
    with serve(app, **settings) as srv:
        conns: list[tuple[Conn, float]] = []
        try:
            for _ in range(8):
                conn = Conn.open(srv.host, srv.port)
                conn.send(build_request())
                assert conn.read_response().status == 200
                conns.append((conn, time.monotonic()))
                select.select([], [], [], 0.25)  # the deliberate stagger
            for conn, answered in conns:
                assert conn.read_until_close(timeout=10.0) == b""
                elapsed = time.monotonic() - answered
                assert 1.9 <= elapsed < 3.8, elapsed
        finally:
            for conn, _ in conns:
                conn.close()
