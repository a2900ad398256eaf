"""The supervisor's side of metrics and draining, without processes (fake clock): counter
fields of exited workers are kept in the totals, and --shutdown-delay holds the stop back."""

from __future__ import annotations

from supervisor.metrics import add, fleet_counters, numbers
from tests.test_supervisor_policy import KILL, TERM, Fleet

FIELDS = ("codes", "rx")


def test_counters_of_exited_workers_are_kept() -> None:
    fleet = Fleet(2, counter_fields=FIELDS)
    fleet.ready()
    first, second = fleet.current(1), fleet.current(2)
    fleet.say(first, "heartbeat", 5, codes="0,0,5,0,1,0", rx="100", lag="0.1")
    fleet.say(second, "heartbeat", 2, codes="0,0,2,0,0,0", rx="40")
    live = [w.fields for w in fleet.policy.workers]
    assert fleet_counters(fleet.policy.totals.counters, live, FIELDS) == {
        "codes": [0, 0, 7, 0, 1, 0], "rx": [140]}
    fleet.exit(first, signum=KILL)  # crashed: its last heartbeat's counts stay
    replacement = fleet.current(1)
    fleet.ready(replacement)
    fleet.say(replacement, "heartbeat", 1, codes="0,0,1,0,0,0", rx="10")
    assert fleet.policy.totals.counters == {"codes": [0, 0, 5, 0, 1, 0], "rx": [100]}  # not "lag": a gauge
    live = [w.fields for w in fleet.policy.workers]
    assert fleet_counters(fleet.policy.totals.counters, live, FIELDS) == {
        "codes": [0, 0, 8, 0, 1, 0], "rx": [150]}


def test_garbled_counter_fields_count_nothing() -> None:
    totals: dict[str, list[float]] = {}
    add(totals, {"codes": "1,x", "rx": "7"}, FIELDS)
    assert totals == {"codes": [], "rx": [7]} and numbers("") == []


def test_shutdown_delay_drains_after_the_delay() -> None:
    fleet = Fleet(2, shutdown_delay=10.0)
    fleet.ready()
    assert fleet.policy.ready and not fleet.policy.draining
    fleet.command(TERM)
    assert fleet.policy.draining and not fleet.policy.ready and not fleet.policy.stopping
    assert not any(signum == TERM for _, signum in fleet.signals)  # the workers serve on
    fleet.advance(9.5)
    assert not fleet.policy.stopping
    assert fleet.policy.next_deadline(fleet.now) <= fleet.now + 0.5
    fleet.advance(1.0)
    assert fleet.policy.stopping
    assert sorted(pid for pid, signum in fleet.signals if signum == TERM) == sorted(
        w.pid for w in fleet.policy.workers)


def test_a_second_sigterm_stops_at_once() -> None:
    fleet = Fleet(1, shutdown_delay=60.0)
    fleet.ready()
    fleet.command(TERM)
    assert not fleet.policy.stopping
    fleet.command(TERM)
    assert fleet.policy.stopping
