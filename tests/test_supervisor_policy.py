"""The supervisor's policy on its own: a fake clock, fake events, no processes (milliseconds).

``Fleet`` plays the master's loop: it answers ``Spawn`` with a made-up pid, records signals and
systemd notifications, answers ``Measure`` from a table, and moves a clock that only the test
advances. Each test then says what a worker did (ready, heartbeat, exit) and checks what the
policy decided.
"""

from __future__ import annotations

import ast
import logging
import math
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from supervisor.budget import (
    EXHAUSTED,
    HOLD,
    LEAD_FACTOR,
    LEAD_MARGIN,
    MAX_LIFETIME,
    MAX_REQUESTS,
    NEARING,
    RESUME,
    Budget,
    lead_time,
)
from supervisor.channel import Message
from supervisor.child import HANDOVER_SIGNAL, REPORT_SIGNAL, RETIRE_SIGNAL, SERVE_ON_SIGNAL
from supervisor.config import SupervisorConfig
from supervisor.policy import (
    HANDOVER_GRACE,
    Measure,
    Notify,
    Phase,
    Policy,
    Reason,
    ReopenLogs,
    Signal,
    Spawn,
    StartTemplate,
    State,
    Template,
    TemplateState,
    Worker,
    backoff,
)

ROOT = Path(__file__).resolve().parent.parent
TERM, KILL, QUIT, ABRT = signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGABRT
RETIRE = RETIRE_SIGNAL  # SIGHUP: retire while the others serve (TERM: the whole server stops)
REPORT = REPORT_SIGNAL  # SIGUSR2: log where your memory grew
HANDOVER = HANDOVER_SIGNAL  # your replacement is ready: leave at your limit
SERVE_ON = SERVE_ON_SIGNAL  # your replacement could not start: serve on


def exit_status(code: int = 0, signum: int | None = None) -> int:
    """A wait status as os.waitpid returns it."""
    return signum if signum is not None else code << 8


class Fleet:
    def __init__(self, workers: int = 2, *, defer_start: bool = False, **config: Any) -> None:
        self.now = 1000.0
        self.log = logging.getLogger("test.policy")
        self.policy = Policy(SupervisorConfig(workers=workers, **config), mainpid=1, logger=self.log,
                             rng=random.Random(7))
        self.defer_start = defer_start  # leave new workers without a pid until start_pending()
        self.pending: list[Worker] = []
        self.next_pid = 100
        self.spawned: list[Worker] = []
        self.spawns: list[Spawn] = []
        self.signals: list[tuple[int, int]] = []
        self.notified: list[tuple[str, ...]] = []
        self.usage: dict[int, int] = {}  # pid -> USS bytes answered to Measure
        self.reopened = 0
        self.templates: list[Template] = []  # every template started (--preload)
        self.forked_from: dict[Worker, Template | None] = {}
        self.policy.start(self.now)
        self.apply()

    # -- the loop's side ---------------------------------------------------------------------
    def apply(self) -> None:
        policy = self.policy
        while actions := policy.take():
            for action in actions:
                if isinstance(action, StartTemplate):
                    self.templates.append(action.template)
                    self.next_pid += 1
                    policy.template_started(action.template, self.next_pid, self.now)
                elif isinstance(action, Spawn):
                    self.spawns.append(action)
                    self.spawned.append(action.worker)
                    self.forked_from[action.worker] = action.template
                    if self.defer_start:
                        self.pending.append(action.worker)
                    else:
                        self._start(action.worker)
                elif isinstance(action, Signal):
                    self.signals.append((action.pid, action.signum))
                elif isinstance(action, Notify):
                    self.notified.append(action.fields)
                elif isinstance(action, Measure):
                    policy.memory({w: self.usage.get(w.pid or 0) for w in action.workers}, self.now)
                elif isinstance(action, ReopenLogs):
                    self.reopened += 1

    def _start(self, worker: Worker) -> None:
        self.next_pid += 1
        self.policy.started(worker, self.next_pid, self.now)

    def start_pending(self) -> None:
        while self.pending:
            self._start(self.pending.pop(0))
        self.apply()

    # -- what the test makes happen ------------------------------------------------------------
    def advance(self, seconds: float, beat: bool = True) -> None:
        """Let time pass in small steps; ready workers send heartbeats unless ``beat`` is off."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.25)
            if beat:
                for worker in self.serving() + self.holding():
                    self.say(worker, "heartbeat", worker.requests)
            self.policy.tick(self.now)
            self.apply()

    def say(self, worker: Worker, kind: str, requests: int | None = None, **fields: str) -> None:
        self.policy.message(worker, Message(kind, requests, fields), self.now)
        self.policy.tick(self.now)
        self.apply()

    def ready(self, *workers: Worker) -> None:
        for worker in workers or self.starting():
            self.say(worker, "ready")

    def template_ready(self, template: Template | None = None) -> None:
        self.policy.template_ready(template or self.templates[-1], self.now)
        self.policy.tick(self.now)
        self.apply()

    def template_exit(self, template: Template, code: int = 0, signum: int | None = None) -> None:
        self.policy.template_exited(template, exit_status(code, signum), self.now)
        self.policy.tick(self.now)
        self.apply()

    def exit(self, worker: Worker, code: int = 0, signum: int | None = None) -> None:
        self.policy.exited(worker, exit_status(code, signum), self.now)
        self.policy.tick(self.now)
        self.apply()

    def exit_signalled(self) -> None:
        """Every worker that got RETIRE, TERM, QUIT or KILL exits."""
        told = {pid for pid, signum in self.signals if signum in (RETIRE, TERM, QUIT, KILL)}
        for worker in list(self.policy.workers):
            if worker.pid in told:
                self.exit(worker)

    def command(self, signum: int) -> None:
        self.policy.command(signum, self.now)
        self.policy.tick(self.now)
        self.apply()

    # -- what the test looks at -----------------------------------------------------------------
    def starting(self) -> list[Worker]:
        return [w for w in self.policy.workers if w.state is State.STARTING]

    def serving(self) -> list[Worker]:
        return [w for w in self.policy.workers if w.state is State.SERVING]

    def holding(self) -> list[Worker]:
        return [w for w in self.policy.workers if w.state is State.HOLDING]

    def current(self, number: int) -> Worker:
        worker = self.policy.slots[number].current
        assert worker is not None
        return worker

    def signalled(self, worker: Worker | Template) -> list[int]:
        return [signum for pid, signum in self.signals if pid == worker.pid]

    def notes(self) -> list[str]:
        return [line for fields in self.notified for line in fields]


@pytest.fixture
def running() -> Fleet:
    fleet = Fleet(2)
    fleet.ready()
    assert fleet.policy.phase is Phase.RUNNING
    return fleet


def test_startup_spawns_every_slot_and_is_ready_when_all_serve() -> None:
    fleet = Fleet(3)
    assert [w.number for w in fleet.spawned] == [1, 2, 3]
    assert fleet.policy.phase is Phase.STARTING
    first, second, third = fleet.spawned
    fleet.ready(first, second)
    assert not any("READY=1" in fields for fields in fleet.notified)
    fleet.ready(third)
    assert fleet.policy.phase is Phase.RUNNING
    ready = [fields for fields in fleet.notified if "READY=1" in fields]
    assert len(ready) == 1 and "MAINPID=1" in ready[0]
    assert fleet.policy.status_text() == "3 of 3 workers serving, 0 requests served"


def test_a_crash_is_respawned_at_once_then_with_backoff(running: Fleet) -> None:
    victim = running.current(1)
    running.exit(victim, signum=KILL)
    replacement = running.current(1)
    assert replacement is not victim and replacement.pid is not None  # immediately
    assert victim.reason is Reason.CRASH and running.policy.totals.restarts["crash"] == 1
    running.exit(replacement, code=1)  # the slot's second failure in a row (never ready)
    assert running.policy.slots[1].current is None
    running.advance(backoff(2) / 2)
    assert running.policy.slots[1].current is None
    running.advance(backoff(2))
    again = running.current(1)
    running.ready(again)
    running.exit(again, signum=KILL)  # a worker that became ready reset the count
    assert running.current(1) is not again


def test_workers_failing_before_ready_at_startup_end_the_master_with_code_3() -> None:
    fleet = Fleet(2, startup_attempts=3)
    for _ in range(3):
        fleet.exit(fleet.current(1), code=1)
        fleet.advance(backoff(3) + 0.1)
    assert fleet.policy.phase is Phase.STOPPING
    assert fleet.policy.exit_code == 3
    assert TERM in fleet.signalled(fleet.current(2))  # the others are stopped
    fleet.exit_signalled()
    assert fleet.policy.finished


def test_a_worker_silent_past_the_timeout_is_aborted_then_killed(running: Fleet) -> None:
    quiet = running.current(1)
    chatty = running.current(2)
    for _ in range(12):  # 3 s: only worker 2 keeps sending heartbeats
        running.now += 0.25
        running.say(chatty, "heartbeat", 1)
    assert running.signalled(quiet) == []
    running.policy.config.timeout_worker = 2.0
    running.say(chatty, "heartbeat", 1)
    assert running.signalled(quiet) == [ABRT]
    assert quiet.state is State.ABORTING and quiet.reason is Reason.HUNG
    assert running.policy.slots[1].current is not quiet  # its slot is refilled meanwhile
    running.advance(running.policy.config.abort_grace + 0.25)
    assert running.signalled(quiet) == [ABRT, KILL]
    assert running.signalled(chatty) == []


def test_a_master_that_did_not_run_awaits_the_heartbeats_anew(running: Fleet) -> None:
    """Ctrl-Z then fg, docker pause then unpause: the master's clock jumps while every worker
    stood still with it; none is taken for hung, and one that stays silent still is."""
    running.policy.config.timeout_worker = 2.0
    quiet, chatty = running.current(1), running.current(2)
    running.now += 30.0  # no tick meanwhile: the master was stopped
    running.policy.tick(running.now)
    assert running.signalled(quiet) == running.signalled(chatty) == []
    for _ in range(12):  # 3 s more: only worker 2 sends heartbeats
        running.now += 0.25
        running.say(chatty, "heartbeat", 1)
    assert running.signalled(quiet) == [ABRT]
    assert running.signalled(chatty) == []


def test_a_worker_that_never_becomes_ready_is_aborted(running: Fleet) -> None:
    running.policy.config.startup_timeout = 5.0
    running.exit(running.current(1), signum=KILL)
    late = running.current(1)
    running.advance(5.5)
    assert running.signalled(late) == [ABRT]
    assert late.reason is Reason.HUNG


def test_reload_replaces_one_at_a_time_and_retires_only_after_the_successor_is_ready(running: Fleet) -> None:
    old = [running.current(1), running.current(2)]
    running.command(signal.SIGHUP)
    assert running.policy.phase is Phase.RELOADING
    assert any(line.startswith("MONOTONIC_USEC=") for line in running.notes())
    successors = running.starting()
    assert len(successors) == 1 and successors[0].generation == 2  # rotate_at_once: 1 of 2
    running.advance(1.0)
    assert all(running.signalled(w) == [] for w in old)  # nothing retired before a successor is ready
    running.ready(successors[0])
    assert running.signalled(old[0]) == [RETIRE] and running.signalled(old[1]) == []
    running.ready()
    assert running.signalled(old[1]) == [RETIRE]
    assert running.policy.phase is Phase.RUNNING
    assert running.notes().count("READY=1") == 2
    assert {running.current(1).generation, running.current(2).generation} == {2}


def test_a_broken_deploy_keeps_the_old_workers(running: Fleet) -> None:
    old = [running.current(1), running.current(2)]
    running.command(signal.SIGHUP)
    running.exit(running.starting()[0], code=1)  # the new code fails to import
    assert running.policy.phase is Phase.RUNNING
    assert [running.current(1), running.current(2)] == old
    assert all(w.reason is None for w in old)  # no longer flagged for replacement
    running.advance(2.0)
    assert running.starting() == [] and all(running.signalled(w) == [] for w in old)
    assert any(line.startswith("STATUS=Reload failed") for line in running.notes())


def budgeted(workers: int = 2, **config: Any) -> Fleet:
    fleet = Fleet(workers, **{"max_requests": 100, **config})
    fleet.ready()
    return fleet


def test_nearing_starts_the_replacement_and_the_old_worker_finishes_its_budget() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    assert old.requests_limit == 100
    fleet.say(old, "nearing", 60, eta="0.5")
    assert old.reason is Reason.MAX_REQUESTS
    successor = fleet.policy.slots[1].successor
    assert successor is not None and fleet.signalled(old) == []
    fleet.advance(0.1)
    fleet.ready(successor)
    assert fleet.current(1) is successor and old.state is State.FINISHING
    assert fleet.signalled(old) == [HANDOVER_SIGNAL]  # "stop at your limit"
    assert len(fleet.serving()) == 2 and old in fleet.policy.workers  # one more, not one less
    fleet.say(old, "retiring", reason="max_requests")
    assert old.state is State.RETIRING and fleet.starting() == []  # its slot is already filled
    fleet.say(old, "heartbeat", 103)
    fleet.exit(old)
    assert fleet.signalled(old) == [HANDOVER_SIGNAL]  # never a TERM on top
    assert fleet.policy.totals.restarts["max_requests"] == 1 and fleet.policy.totals.requests == 103


def test_a_finishing_worker_short_of_its_budget_is_retired_after_the_grace() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "nearing", 90, eta="0.1")
    fleet.ready(fleet.starting()[0])
    fleet.advance(HANDOVER_GRACE - 0.25)  # traffic dropped: it stays short of its budget
    assert fleet.signalled(old) == [HANDOVER_SIGNAL]
    fleet.advance(0.5)
    assert fleet.signalled(old) == [HANDOVER_SIGNAL, RETIRE]


def test_a_slot_keeps_one_finishing_worker_at_most() -> None:
    fleet = budgeted(1)
    first = fleet.current(1)
    fleet.say(first, "nearing", 90, eta="0.5")
    second = fleet.starting()[0]
    fleet.ready(second)
    fleet.say(second, "nearing", 10, eta="0.5")  # a short life: it asks at once
    third = fleet.starting()[0]
    fleet.ready(third)
    assert fleet.signalled(first) == [HANDOVER_SIGNAL, RETIRE]
    assert second.state is State.FINISHING and fleet.current(1) is third


def test_a_late_replacement_finds_the_old_worker_holding_at_its_budget_and_retires_it() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "nearing", 95, eta="0.05")
    successor = fleet.policy.slots[1].successor
    fleet.say(old, "holding", 100, reason="max_requests")  # at its limit; the replacement still boots
    assert old.state is State.HOLDING and fleet.signalled(old) == []  # it waits: no exit yet
    assert fleet.policy.status_text().startswith("1 of 2 workers serving") and fleet.policy.ready
    fleet.advance(1.0)  # a slow boot: it holds on (its heartbeats go on)
    assert old.state is State.HOLDING and fleet.policy.slots[1].successor is successor
    assert fleet.starting() == [successor]  # no second replacement
    fleet.ready(successor)
    assert fleet.signalled(old) == [RETIRE] and old.state is State.RETIRING  # ready: the old one leaves
    assert fleet.current(1) is successor


def test_a_worker_holding_at_its_budget_serves_on_when_its_replacement_fails() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "nearing", 95, eta="0.05")
    fleet.say(old, "holding", 100, reason="max_requests")
    fleet.exit(fleet.starting()[0], code=1)  # a broken deploy: the replacement cannot import
    assert fleet.signalled(old) == [SERVE_ON] and old.state is State.SERVING  # never to zero
    retry = fleet.starting()[0]  # retried at once (then with backoff)
    fleet.say(old, "holding", 100, reason="max_requests")  # sent before SERVE_ON arrived: stale
    assert old.state is State.SERVING
    fleet.exit(retry, code=1)
    assert fleet.signalled(old) == [SERVE_ON]  # told once: it serves on until one is ready
    fleet.say(old, "heartbeat", 180)
    fleet.advance(backoff(2) + 0.25)
    fleet.ready(fleet.starting()[0])
    assert fleet.signalled(old) == [SERVE_ON, RETIRE]  # past its budget: retired at once


def test_a_replacement_failing_before_the_limit_tells_the_old_worker_to_serve_on() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "nearing", 60, eta="0.5")
    fleet.exit(fleet.starting()[0], code=1)
    assert fleet.signalled(old) == [SERVE_ON] and old.state is State.SERVING
    fleet.ready(fleet.starting()[0])  # the retry is ready before the limit: the limit is exact again
    assert fleet.signalled(old) == [SERVE_ON, HANDOVER] and old.state is State.FINISHING


def test_holding_without_nearing_asks_for_the_replacement() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "holding", 100, reason="max_requests")  # its rate was unknown: no "nearing"
    assert old.reason is Reason.MAX_REQUESTS and old.state is State.HOLDING
    assert fleet.policy.slots[1].successor is not None
    fleet.ready(fleet.policy.slots[1].successor)
    assert fleet.signalled(old) == [RETIRE]


def test_a_holding_worker_with_no_replacement_on_the_way_serves_on() -> None:
    fleet = Fleet(1, max_requests=100, preload=lambda: 0)
    fleet.template_ready()
    old = fleet.current(1)
    fleet.ready(old)
    fleet.template_exit(fleet.templates[0], signum=KILL)  # restarted with backoff: nothing to fork from
    fleet.say(old, "holding", 100, reason="max_requests")
    assert fleet.policy.slots[1].successor is None
    assert fleet.signalled(old) == [SERVE_ON] and old.state is State.SERVING


def test_a_worker_that_keeps_no_budget_is_replaced_from_its_heartbeats() -> None:
    fleet = budgeted()
    lax = fleet.current(1)
    fleet.say(lax, "heartbeat", 99)
    assert fleet.starting() == []
    fleet.say(lax, "heartbeat", 100)
    assert lax.reason is Reason.MAX_REQUESTS and len(fleet.starting()) == 1
    fleet.ready(fleet.starting()[0])
    assert fleet.signalled(lax) == [RETIRE]


def test_a_replacement_that_fails_keeps_the_old_worker_and_is_retried() -> None:
    fleet = budgeted()
    old = fleet.current(1)
    fleet.say(old, "nearing", 80, eta="0.2")
    fleet.exit(fleet.starting()[0], code=1)  # a broken deploy: retried at once, then with backoff
    fleet.exit(fleet.starting()[0], code=1)
    fleet.say(old, "heartbeat", 150)  # told to serve on (once): past its limit meanwhile
    assert fleet.current(1) is old and fleet.signalled(old) == [SERVE_ON] and fleet.starting() == []
    fleet.advance(backoff(2) + 0.25)
    retry = fleet.policy.slots[1].successor
    assert retry is not None
    fleet.ready(retry)
    assert fleet.signalled(old) == [SERVE_ON, RETIRE]


def test_budget_replacements_are_not_held_back_by_rotate_at_once() -> None:
    fleet = budgeted(4)
    assert fleet.policy.rotate_at_once == 1
    for number in range(1, 5):
        fleet.say(fleet.current(number), "nearing", 90, eta="0.1")
    assert len(fleet.starting()) == 4


def test_lifetime_replacement_starts_ahead_and_the_old_worker_leaves_at_its_lifetime() -> None:
    fleet = Fleet(1, max_lifetime=10.0)
    fleet.advance(0.5)  # a boot of half a second
    old = fleet.current(1)
    fleet.ready(old)
    lead = lead_time(0.5)
    fleet.advance(10.0 - lead - 0.3)
    assert fleet.starting() == []
    fleet.advance(0.5)
    successor = fleet.policy.slots[1].successor
    assert successor is not None and old.reason is Reason.MAX_LIFETIME
    fleet.advance(0.25)
    fleet.ready(successor)
    assert old.state is State.FINISHING and fleet.signalled(old) == [HANDOVER]  # it leaves at its end
    assert fleet.now < (old.lifetime_end or 0)
    fleet.advance((old.lifetime_end or 0) - fleet.now - 0.1)
    assert fleet.signalled(old) == [HANDOVER]
    fleet.advance(0.25)
    assert fleet.signalled(old) == [HANDOVER, RETIRE]  # (for a worker that does not keep lifetimes)


def test_a_lifetime_that_ends_before_the_replacement_is_ready_waits_for_it() -> None:
    fleet = Fleet(1, max_lifetime=2.0)
    old = fleet.current(1)
    fleet.ready(old)
    fleet.advance(2.0)  # the replacement takes longer than the lifetime that is left
    assert fleet.signalled(old) == [] and old.state is State.SERVING and old.reason is Reason.MAX_LIFETIME
    fleet.say(old, "holding", 40, reason="max_lifetime")  # at its end: it stops accepting, and waits
    assert old.state is State.HOLDING and old.reason is Reason.MAX_LIFETIME
    fleet.advance(1.0)
    fleet.ready(fleet.starting()[0])
    assert fleet.signalled(old) == [RETIRE]


def test_boot_times_set_how_early_a_lifetime_replacement_starts() -> None:
    fleet = Fleet(1, max_lifetime=60.0)
    fleet.advance(4.0)  # a slow boot is remembered
    first = fleet.current(1)
    fleet.ready(first)
    assert fleet.policy.boot_estimate() == pytest.approx(4.0)
    assert fleet.policy.lead(first) == pytest.approx(lead_time(4.0))
    fleet.advance(60.0 - lead_time(4.0) + 0.3)
    assert first.reason is Reason.MAX_LIFETIME


def test_a_finishing_worker_over_its_memory_limit_is_retired() -> None:
    fleet = budgeted(1, max_memory=100, memory_samples=3, memory_interval=0.5)
    old = fleet.current(1)
    fleet.say(old, "nearing", 90, eta="1")
    fleet.ready(fleet.starting()[0])
    fleet.usage[old.pid or 0] = 150 << 20
    fleet.advance(0.6)
    assert fleet.signalled(old) == [HANDOVER_SIGNAL, RETIRE]


# -- the worker's side of a budget (supervisor.budget) -------------------------------------------


def drive(budget: Budget, rate: float, start: float, until: int) -> list[tuple[int, str]]:
    """Requests at a steady ``rate`` from ``start``, checked as a request hook would."""
    decisions = []
    for served in range(1, until + 1):
        if served >= budget.check_at:
            decision = budget.update(served, start + served / rate)
            if decision:
                decisions.append((served, decision))
    return decisions


def test_budget_asks_ahead_at_twice_the_highest_rate() -> None:
    budget = Budget(1000, lead=1.0, now=0.0)
    decisions = drive(budget, rate=100.0, start=0.0, until=1020)
    (asked_at, decision), held = decisions
    assert decision == NEARING
    assert 1000 - 2 * 100 * 1.0 - 30 <= asked_at <= 1000 - 2 * 100 * 1.0  # 200 requests ahead, not later
    assert held == (1000, HOLD) and budget.spent == MAX_REQUESTS  # at the limit, replaced or not
    assert budget.check_at == math.inf
    assert budget.hand_over(1000) == EXHAUSTED


def test_budget_handed_over_early_stops_exactly_at_the_limit() -> None:
    budget = Budget(100, lead=0.5, now=0.0)
    assert drive(budget, rate=100.0, start=0.0, until=80)[0][1] == NEARING
    assert budget.hand_over(80) is None and budget.check_at == 100
    assert budget.update(99, 0.99) is None
    assert budget.update(100, 1.0) == EXHAUSTED


def test_budget_holds_at_the_limit_until_handed_over_or_told_to_serve_on() -> None:
    budget = Budget(100, lead=0.5, now=0.0)
    assert budget.update(100, 1.0) == HOLD  # its replacement is not ready: stop accepting, stay
    assert budget.update(101, 1.1) is None and budget.expire() is None  # holding already
    assert budget.hand_over(101) == EXHAUSTED  # ready: leave
    assert budget.hand_over(101) is None and budget.serve_on() is None  # (once)

    broken = Budget(100, lead=0.5, now=0.0)
    assert broken.update(100, 1.0) == HOLD
    assert broken.serve_on() == RESUME  # the replacement could not start: accept again
    assert broken.update(150, 1.5) is None and broken.serve_on() is None  # serves on past the limit
    assert broken.hand_over(150) == EXHAUSTED  # until the next replacement is ready

    early = Budget(100, lead=0.5, now=0.0)
    assert early.serve_on() is None  # a replacement failed before the limit: no hold at it
    assert early.update(100, 1.0) is None and early.hand_over(120) == EXHAUSTED


def test_budget_lifetime_holds_or_leaves_like_the_request_limit() -> None:
    alone = Budget(0, lead=0.5, now=0.0)  # --max-lifetime only
    assert alone.check_at == math.inf and alone.update(10, 1.0) is None
    assert alone.expire() == HOLD and alone.spent == MAX_LIFETIME
    assert alone.hand_over(10) == EXHAUSTED
    handed = Budget(1000, lead=0.5, now=0.0)
    assert handed.hand_over(10) is None and handed.check_at == 1000
    assert handed.expire() == EXHAUSTED and handed.spent == MAX_LIFETIME


def test_budget_ignores_the_wait_before_the_first_request() -> None:
    # Ready at 0, idle for 30 s (no connections yet), then 100 requests a second.
    budget = Budget(1000, lead=1.0, now=0.0)
    (asked_at, _), _ = drive(budget, rate=100.0, start=30.0, until=1000)
    assert asked_at >= 1000 - 2 * 100 * 1.0 - 30  # not fooled into a rate of 3 a second


def test_budget_with_a_lead_longer_than_its_life_asks_at_once() -> None:
    budget = Budget(50, lead=5.0, now=0.0)
    (asked_at, _), _ = drive(budget, rate=100.0, start=0.0, until=50)
    assert asked_at <= 12
    assert lead_time(0.1, 0.3) == pytest.approx(LEAD_FACTOR * 0.3 + LEAD_MARGIN)


def test_budget_shorter_than_the_rate_window_asks_at_once_at_the_fleets_rate() -> None:
    # 50 requests at 1,500/s last 33 ms: less than the 50 ms it takes to measure a rate.
    assert Budget(50, lead=0.25, now=0.0).update(1, 0.0) is None  # no rate: it cannot know
    budget = Budget(50, lead=0.25, now=0.0, rate=1500.0)
    assert budget.update(0, 0.0) is None  # idle: a worker that serves nothing asks for nothing
    assert budget.update(1, 0.001) == NEARING and budget.eta == pytest.approx(50 / 3000)
    assert Budget(100_000, lead=0.25, now=0.0, rate=1500.0).update(1, 0.0) is None  # far off


def test_new_workers_get_the_highest_rate_of_the_workers_that_exited() -> None:
    fleet = Fleet(1, max_requests=100)
    fleet.ready()
    assert fleet.spawned[-1].requests_limit == 100 and fleet.policy.rate_estimate() == 0.0
    worker = fleet.current(1)
    fleet.advance(0.5, beat=False)
    fleet.say(worker, "nearing", 90, eta="0.01")
    fleet.ready(fleet.starting()[0])
    fleet.say(worker, "retiring", reason="max_requests")
    fleet.say(worker, "heartbeat", 100)
    fleet.exit(worker)
    assert fleet.policy.rate_estimate() == pytest.approx(200.0)  # 100 requests in 0.5 s
    assert [spawn.rate_estimate for spawn in fleet.spawns] == [0.0, 0.0]
    fleet.say(fleet.current(1), "retiring", reason="max_requests")  # its slot is refilled at once
    fleet.apply()
    assert fleet.spawns[-1].rate_estimate == pytest.approx(200.0)


def test_jitter_spreads_the_budgets() -> None:
    fleet = Fleet(8, max_requests=100, max_requests_jitter=20)
    limits = {w.requests_limit for w in fleet.spawned}
    assert len(limits) > 1 and all(100 <= limit <= 120 for limit in limits)


def test_max_memory_needs_consecutive_samples_and_twice_the_limit_is_at_once() -> None:
    fleet = Fleet(2, max_memory=100, memory_samples=3, memory_interval=0.5)
    fleet.ready()
    slow, fast = fleet.current(1), fleet.current(2)
    MiB = 1 << 20
    fleet.usage[slow.pid or 0] = 150 * MiB
    fleet.advance(0.6)
    assert slow.reason is None  # one or two samples are not enough
    fleet.advance(1.0)
    assert slow.reason is Reason.MAX_MEMORY and fleet.signalled(slow) == [REPORT]  # where it grew
    fleet.usage[fast.pid or 0] = 250 * MiB
    fleet.advance(0.5)
    assert fleet.signalled(fast) == [REPORT, RETIRE]  # no waiting for its replacement
    assert fast.state is State.RETIRING


def test_term_stops_every_worker_and_kills_the_stragglers(running: Fleet) -> None:
    running.policy.config.graceful_timeout = 2.0
    running.policy.config.stop_margin = 1.0
    first, second = running.current(1), running.current(2)
    running.command(TERM)
    assert running.policy.phase is Phase.STOPPING and "STOPPING=1" in running.notes()
    assert running.signalled(first) == [TERM] and running.signalled(second) == [TERM]
    assert first.state is State.RETIRING and second.state is State.RETIRING
    running.exit(first)
    running.advance(2.5)
    assert running.signalled(second) == [TERM]
    running.advance(1.0)
    assert running.signalled(second) == [TERM, KILL]
    running.exit(second, signum=KILL)
    assert running.policy.finished and running.policy.exit_code == 0
    assert running.starting() == []  # nothing respawned while stopping
    assert running.policy.totals.restarts == {}


def test_int_is_quick_and_a_second_int_kills(running: Fleet) -> None:
    running.command(signal.SIGHUP)  # a reload in flight: its successor is stopped too
    running.command(signal.SIGINT)
    assert running.policy.phase is Phase.HALTING
    assert all(running.signalled(w) == [QUIT] for w in running.policy.workers)
    running.command(signal.SIGINT)
    assert all(running.signalled(w) == [QUIT, KILL] for w in running.policy.workers)


def test_ttin_adds_a_slot_and_ttou_retires_the_last(running: Fleet) -> None:
    running.command(signal.SIGTTIN)
    assert sorted(running.policy.slots) == [1, 2, 3]
    third = running.current(3)
    running.ready(third)
    running.command(signal.SIGTTOU)
    assert sorted(running.policy.slots) == [1, 2]
    assert running.signalled(third) == [RETIRE] and third.reason is Reason.SCALE
    running.exit(third)
    assert running.policy.totals.restarts["scale"] == 1
    running.command(signal.SIGTTOU)
    running.command(signal.SIGTTOU)
    assert sorted(running.policy.slots) == [1]


def test_a_worker_stopped_while_starting_is_logged_as_such(caplog: pytest.LogCaptureFixture) -> None:
    """A worker retired before it was ready (SIGTTOU, a reload or a stop while it imports the
    app) and killed by the signal it has no handler for yet is "stopped before it was ready",
    not "killed by SIGHUP after retiring" (its log line said so before)."""
    fleet = Fleet(3)
    first, third = fleet.current(1), fleet.current(3)
    fleet.ready(first, fleet.current(2))
    caplog.set_level(logging.INFO, logger="test.policy")
    fleet.command(signal.SIGTTOU)
    fleet.exit(third, signum=RETIRE)
    fleet.command(signal.SIGTTIN)
    fourth = fleet.current(3)
    fleet.command(signal.SIGTERM)
    fleet.exit(fourth, signum=TERM)
    fleet.exit(first)
    assert [r.getMessage() for r in caplog.records if "pid" in r.getMessage()] == [
        f"Worker 3 (pid {third.pid}) was stopped before it was ready (SIGTTOU); it was killed by SIGHUP.",
        f"Worker 3 (pid {fourth.pid}) was stopped before it was ready (the master stops); it was killed by SIGTERM.",
        f"Worker 1 (pid {first.pid}) exited with code 0 after retiring (0 request(s) served).",
    ]


def test_usr1_reopens_the_masters_logs_and_reaches_every_worker(running: Fleet) -> None:
    running.command(signal.SIGUSR1)
    assert running.reopened == 1
    assert all(running.signalled(w) == [signal.SIGUSR1] for w in running.policy.workers)


def test_usr2_asks_every_worker_for_a_memory_report(running: Fleet) -> None:
    running.command(signal.SIGUSR2)
    assert all(running.signalled(w) == [REPORT] for w in running.policy.workers)
    assert all(w.state is State.SERVING for w in running.policy.workers)


def test_a_worker_retiring_on_its_own_is_replaced_at_once(running: Fleet) -> None:
    leaving = running.current(1)
    running.say(leaving, "retiring")
    assert leaving.state is State.RETIRING and running.signalled(leaving) == []
    assert running.current(1) is not leaving  # refilled without waiting for its exit


def test_totals_keep_what_exited_workers_served(running: Fleet) -> None:
    first, second = running.current(1), running.current(2)
    running.say(first, "heartbeat", 40, open="3")
    running.say(second, "heartbeat", 2)
    assert first.fields == {"open": "3"}
    running.exit(first, signum=KILL)
    assert running.policy.requests_served() == 42
    running.policy.message(first, Message("heartbeat", 45), running.now)  # drained after the exit
    assert running.policy.requests_served() == 47
    assert running.policy.history[-1] is first and first.status == "was killed by SIGKILL"


def test_signals_wait_for_a_worker_to_have_a_pid() -> None:
    fleet = Fleet(1, defer_start=True)
    worker = fleet.spawned[0]
    fleet.command(TERM)
    assert fleet.signals == []
    fleet.start_pending()
    assert fleet.signalled(worker) == [TERM]


def test_next_deadline_is_the_nearest_timer(running: Fleet) -> None:
    cfg = running.policy.config
    cfg.timeout_worker = 0.5
    assert running.policy.next_deadline(running.now) == pytest.approx(running.now + 0.5)
    cfg.timeout_worker = 30.0
    assert running.policy.next_deadline(running.now) == pytest.approx(running.now + 1.0)  # the idle tick


# -- --preload: workers forked from a template -------------------------------------------------


def preloading(workers: int = 2, **config: Any) -> Fleet:
    """A fleet whose template loaded the app and whose workers all serve."""
    fleet = Fleet(workers, preload=lambda: None, **config)
    fleet.template_ready()
    fleet.ready()
    assert fleet.policy.phase is Phase.RUNNING
    return fleet


def test_preload_starts_the_template_first_and_forks_every_worker_from_it() -> None:
    fleet = Fleet(2, preload=lambda: None)
    assert len(fleet.templates) == 1 and fleet.spawned == []  # nothing to fork from yet
    template = fleet.templates[0]
    fleet.advance(1.0)
    assert fleet.spawned == []
    fleet.template_ready(template)
    assert len(fleet.spawned) == 2 and all(fleet.forked_from[w] is template for w in fleet.spawned)
    fleet.ready()
    assert fleet.policy.phase is Phase.RUNNING
    fleet.exit(fleet.current(1), signum=KILL)  # a crash: respawned from the same template
    fleet.command(signal.SIGTTIN)  # and a new slot too
    assert [fleet.forked_from[w] for w in fleet.spawned[2:]] == [template, template]
    assert len(fleet.templates) == 1


def test_preload_reload_waits_for_the_new_template_then_stops_the_old_one() -> None:
    fleet = preloading(2)
    old_template, old = fleet.templates[0], fleet.serving()
    fleet.command(signal.SIGHUP)
    assert len(fleet.templates) == 2 and fleet.starting() == []  # the new code loads first
    new_template = fleet.templates[1]
    fleet.advance(1.0)
    assert fleet.starting() == [] and fleet.signalled(old_template) == []
    fleet.template_ready(new_template)
    for _ in range(2):  # rotate_at_once 1: one replacement at a time
        (successor,) = fleet.starting()
        assert fleet.forked_from[successor] is new_template and successor.generation == 2
        fleet.ready(successor)
        fleet.exit_signalled()
    assert fleet.policy.phase is Phase.RUNNING and all(w not in fleet.policy.workers for w in old)
    assert fleet.signalled(old_template) == [TERM] and old_template.state is TemplateState.STOPPING
    fleet.template_exit(old_template)
    assert fleet.policy.templates == [new_template] and fleet.policy.template_failures == 0


def test_preload_broken_deploy_keeps_the_old_template_and_workers() -> None:
    fleet = preloading(2)
    old_template, old = fleet.templates[0], set(fleet.serving())
    fleet.command(signal.SIGHUP)
    fleet.template_exit(fleet.templates[1], code=1)  # the new code does not import
    assert fleet.policy.phase is Phase.RUNNING and any("STATUS=Reload failed" in n for n in fleet.notes())
    assert set(fleet.serving()) == old and all(w.reason is None and fleet.signalled(w) == [] for w in old)
    assert fleet.policy.templates == [old_template] and fleet.policy.generation == 1
    assert len(fleet.templates) == 2  # no new template: the old one forks what is needed
    fleet.exit(fleet.current(2), signum=KILL)
    (respawned,) = fleet.starting()
    assert fleet.forked_from[respawned] is old_template and respawned.generation == 1
    fleet.ready(respawned)
    fleet.command(signal.SIGHUP)  # a fixed deploy reloads as usual
    fleet.template_ready(fleet.templates[-1])
    assert [w.generation for w in fleet.starting()] == [2]  # the failed one left no worker


def test_preload_a_new_worker_failing_aborts_the_reload_and_stops_the_new_template() -> None:
    fleet = preloading(2)
    old_template = fleet.templates[0]
    fleet.command(signal.SIGHUP)
    new_template = fleet.templates[1]
    fleet.template_ready(new_template)
    fleet.exit(fleet.starting()[0], code=3)  # its lifespan startup failed
    assert fleet.policy.phase is Phase.RUNNING and fleet.policy.generation == 1
    assert fleet.signalled(new_template) == [TERM] and fleet.signalled(old_template) == []


def test_a_template_that_dies_is_restarted_with_backoff_while_the_workers_serve() -> None:
    fleet = preloading(2)
    serving = set(fleet.serving())
    first = fleet.templates[0]
    fleet.template_exit(first, signum=KILL)
    assert len(fleet.templates) == 2  # the first restart is immediate
    fleet.template_exit(fleet.templates[1], code=1)  # and fails before it is ready
    assert len(fleet.templates) == 2
    fleet.advance(backoff(2))
    assert len(fleet.templates) == 3  # then after a backoff
    assert set(fleet.serving()) == serving and all(fleet.signalled(w) == [] for w in serving)
    fleet.exit(fleet.current(1), signum=KILL)
    assert fleet.starting() == []  # the respawn waits for a template
    fleet.template_ready(fleet.templates[2])
    (respawned,) = fleet.starting()
    assert fleet.forked_from[respawned] is fleet.templates[2]
    assert fleet.policy.template_failures == 0


def test_a_template_failing_before_ready_at_startup_ends_the_master_with_code_3() -> None:
    fleet = Fleet(2, preload=lambda: None, startup_attempts=3)
    for _ in range(3):
        fleet.template_exit(fleet.templates[-1], code=1)
        fleet.advance(10.0)
    assert fleet.policy.finished and fleet.policy.exit_code == 3 and len(fleet.templates) == 3


def test_a_template_that_never_loads_the_app_is_killed_and_retried() -> None:
    fleet = Fleet(1, preload=lambda: None, startup_timeout=5.0)
    template = fleet.templates[0]
    fleet.advance(5.5)
    assert fleet.signalled(template) == [KILL]
    fleet.template_exit(template, signum=KILL)
    assert len(fleet.templates) == 2 and fleet.policy.template_failures == 1


def test_stopping_stops_the_templates_and_waits_for_them() -> None:
    fleet = preloading(1)
    template, worker = fleet.templates[0], fleet.current(1)
    fleet.command(TERM)
    assert fleet.signalled(template) == [TERM] and fleet.signalled(worker) == [TERM]
    fleet.exit(worker)
    assert not fleet.policy.finished
    fleet.template_exit(template)
    assert fleet.policy.finished and fleet.policy.exit_code == 0


def test_only_the_transition_table_changes_a_workers_state() -> None:
    """Rule 2 of supervisor/policy.py: no ``something.state = ...`` outside ``_transition`` (and
    ``_template_transition`` for templates)."""
    offenders = []
    for path in sorted((ROOT / "supervisor").glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for target in targets:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Attribute) and leaf.attr == "state" and function.name not in ("_transition", "_template_transition"):
                            offenders.append(f"{path.name}:{node.lineno} in {function.name}")
    assert offenders == []


def test_a_bursts_rate_does_not_outlive_the_burst() -> None:
    """Workers that leave idle bring the estimate down: after a burst, the fleet's rate does not
    make every new idle worker ask for its replacement at once, forever (it did: c1eb904's
    metrics test saw workers recycled with 0 requests while no client was connected)."""
    fleet = Fleet(1, max_requests=100)
    fleet.ready()
    worker = fleet.current(1)
    fleet.advance(0.5, beat=False)
    fleet.say(worker, "heartbeat", 100)
    fleet.exit(worker, signum=KILL)
    assert fleet.policy.rate_estimate() == pytest.approx(200.0)
    for _ in range(8):  # idle workers that were replaced at once, each after 0.25 s serving nothing
        idle = fleet.current(1)
        fleet.ready(idle)
        fleet.advance(0.25)
        fleet.exit(idle, signum=KILL)
    assert fleet.policy.rate_estimate() == 0.0
