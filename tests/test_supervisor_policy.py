"""The supervisor's policy on its own: a fake clock, fake events, no processes (milliseconds).

``Fleet`` plays the master's loop: it answers ``Spawn`` with a made-up pid, records signals and
systemd notifications, answers ``Measure`` from a table, and moves a clock that only the test
advances. Each test then says what a worker did (ready, heartbeat, exit) and checks what the
policy decided.
"""

from __future__ import annotations

import ast
import logging
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from supervisor.channel import Message
from supervisor.config import SupervisorConfig
from supervisor.policy import (
    Measure,
    Notify,
    Phase,
    Policy,
    Reason,
    ReopenLogs,
    Signal,
    Spawn,
    State,
    Worker,
    backoff,
)

ROOT = Path(__file__).resolve().parent.parent
TERM, KILL, QUIT, ABRT = signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGABRT


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
        self.signals: list[tuple[int, int]] = []
        self.notified: list[tuple[str, ...]] = []
        self.usage: dict[int, int] = {}  # pid -> USS bytes answered to Measure
        self.reopened = 0
        self.policy.start(self.now)
        self.apply()

    # -- the loop's side ---------------------------------------------------------------------
    def apply(self) -> None:
        policy = self.policy
        while actions := policy.take():
            for action in actions:
                if isinstance(action, Spawn):
                    self.spawned.append(action.worker)
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
        """Let time pass in small steps; serving workers send heartbeats unless ``beat`` is off."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.25)
            if beat:
                for worker in self.serving():
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

    def exit(self, worker: Worker, code: int = 0, signum: int | None = None) -> None:
        self.policy.exited(worker, exit_status(code, signum), self.now)
        self.policy.tick(self.now)
        self.apply()

    def exit_signalled(self) -> None:
        """Every worker that got TERM, QUIT or KILL exits."""
        told = {pid for pid, signum in self.signals if signum in (TERM, QUIT, KILL)}
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

    def current(self, number: int) -> Worker:
        worker = self.policy.slots[number].current
        assert worker is not None
        return worker

    def signalled(self, worker: Worker) -> list[int]:
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
    assert running.signalled(old[0]) == [TERM] and running.signalled(old[1]) == []
    running.ready()
    assert running.signalled(old[1]) == [TERM]
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


def test_max_requests_starts_the_replacement_then_retires(running: Fleet) -> None:
    running.policy.config.max_requests = 10
    running.exit(running.current(1))  # its replacement gets a budget
    worker = running.current(1)
    running.ready(worker)
    assert worker.requests_limit == 10
    running.say(worker, "heartbeat", 10)
    assert worker.reason is Reason.MAX_REQUESTS
    successor = running.policy.slots[1].successor
    assert successor is not None and running.signalled(worker) == []
    running.ready(successor)
    assert running.signalled(worker) == [TERM]
    running.exit(worker)
    assert running.policy.totals.requests == 10
    assert running.policy.totals.restarts["max_requests"] == 1


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
    assert slow.reason is Reason.MAX_MEMORY and fleet.signalled(slow) == []
    fleet.usage[fast.pid or 0] = 250 * MiB
    fleet.advance(0.5)
    assert fleet.signalled(fast) == [TERM]  # no waiting for its replacement
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
    assert running.signalled(third) == [TERM] and third.reason is Reason.SCALE
    running.exit(third)
    assert running.policy.totals.restarts["scale"] == 1
    running.command(signal.SIGTTOU)
    running.command(signal.SIGTTOU)
    assert sorted(running.policy.slots) == [1]


def test_usr1_reopens_the_masters_logs_and_reaches_every_worker(running: Fleet) -> None:
    running.command(signal.SIGUSR1)
    assert running.reopened == 1
    assert all(running.signalled(w) == [signal.SIGUSR1] for w in running.policy.workers)


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


def test_only_the_transition_table_changes_a_workers_state() -> None:
    """Rule 2 of supervisor/policy.py: no ``something.state = ...`` outside ``_transition``."""
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
                        if isinstance(leaf, ast.Attribute) and leaf.attr == "state" and function.name != "_transition":
                            offenders.append(f"{path.name}:{node.lineno} in {function.name}")
    assert offenders == []
