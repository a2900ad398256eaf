"""The supervisor's decisions: which worker to start, retire or signal, and when.

Rules this module keeps
-----------------------
1. No I/O and no clock. The policy never forks, signals, reads a pipe or the time: every input
   is an event that carries the time it happened (``now``, monotonic seconds), every output is
   an action (``Spawn``, ``Signal``, ``Notify``, ``Measure``, ``ReopenLogs``) that the master's
   loop applies. Tests drive it with a fake clock and fake events, without processes.
2. One place for state changes: ``_transition`` applies ``TRANSITIONS``; no other code assigns
   ``Worker.state``.
3. Capacity first. A worker that has to go for a planned reason (reload, max requests, max
   lifetime, max memory) is retired only after its replacement has reported ``ready``. Only a
   crash or a hang loses capacity, and only until the respawn. (One exception: a worker above
   twice its --max-memory is retired at once; its connections wait in the kernel backlog.)
4. Never many at once: at most ``rotate_at_once`` replacements are in flight.
5. Every timer is a deadline; ``next_deadline`` says when the policy next wants a ``tick``.
6. A broken deploy never takes the service down: a replacement that fails to start aborts the
   reload and the old workers keep serving.
7. Nothing is forgotten at exit: a worker that exits leaves a record (requests served, why it
   left, how it ended) in ``history`` and in the ``totals``, so counters summed over the fleet
   never go backwards when a worker is replaced.

Theory of operation
-------------------
Capacity is a set of numbered *slots* (``--workers N`` → slots 1..N; TTIN/TTOU add and remove
one). A slot holds its ``current`` worker and, while it is being replaced, a ``successor``.
Workers that left their slot (retiring or aborting) stay in ``workers`` until they exit.

The loop reports what happened: ``started`` (the fork succeeded: the worker has a pid) or
``start_failed``, a ``message`` from a worker's channel, ``exited`` (reaped), ``memory``
samples it was asked for, a ``command`` (a signal to the master) and ``tick`` (time passed).
Each handler changes the records and queues actions; ``take`` hands them to the loop.

Worker states, every change made by ``_transition`` from this table::

    STARTING --ready-------> SERVING          (successor ready: its predecessor gets "retire")
    STARTING/SERVING --retire--> RETIRING     (we send SIGTERM; deadline = graceful bound)
    STARTING/SERVING --retiring--> RETIRING   (the worker said it is leaving on its own)
    STARTING/SERVING --stop--> RETIRING       (the master stops gracefully: SIGTERM)
    STARTING/SERVING/RETIRING --halt--> RETIRING  (the master stops quickly: SIGQUIT)
    STARTING/SERVING/RETIRING --hung--> ABORTING  (SIGABRT; deadline = abort grace, then SIGKILL)
    any --exit (reaped)--> gone               (``exited``: crash accounting, backoff, respawn)

Master phases::

    STARTING  --all slots serving--> RUNNING    (systemd: READY=1)
    RUNNING   --HUP / file change--> RELOADING  (RELOADING=1 ... READY=1 when every slot runs the
                                                 new generation, or the reload failed)
    any       --TERM--> STOPPING                (STOPPING=1; workers get TERM; bounded)
    any       --INT/QUIT--> HALTING             (workers get QUIT: quick stop; a second INT kills)
    STARTING  --crash loop--> STOPPING, exit code 3
"""

from __future__ import annotations

import enum
import logging
import os
import random
import signal
from collections import Counter, deque
from dataclasses import dataclass, field

from supervisor.channel import HEARTBEAT, READY, RETIRING, Message
from supervisor.config import EXIT_OK, EXIT_STARTUP_FAILED, SupervisorConfig

MAX_BACKOFF = 10.0
# --max-memory: above this multiple of the limit a worker is retired without waiting for its
# replacement (rule 3's one exception: a runaway leak must not take the machine down).
HARD_MEMORY_FACTOR = 2.0
# How many exited workers' records are kept (the totals cover all of them).
EXITED_KEPT = 64


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RETIRING = "retiring"
    ABORTING = "aborting"


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RELOADING = "reloading"
    STOPPING = "stopping"
    HALTING = "halting"


class Reason(enum.Enum):
    """Why a worker was replaced or left (its value is the label a metrics exporter uses)."""

    MAX_REQUESTS = "max_requests"
    MAX_LIFETIME = "max_lifetime"
    MAX_MEMORY = "max_memory"
    CRASH = "crash"  # exited without being asked to (or never became ready)
    HUNG = "hung"  # no heartbeat, or not ready in time: aborted
    RELOAD = "reload"
    SCALE = "scale"  # SIGTTOU
    EXIT = "exit"  # retired on its own without saying why
    STOP = "stop"  # the master stopped: not a restart


S = State
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.STARTING, "ready"): S.SERVING,
    (S.STARTING, "retire"): S.RETIRING,
    (S.SERVING, "retire"): S.RETIRING,
    (S.STARTING, "retiring"): S.RETIRING,
    (S.SERVING, "retiring"): S.RETIRING,
    (S.STARTING, "stop"): S.RETIRING,
    (S.SERVING, "stop"): S.RETIRING,
    (S.STARTING, "halt"): S.RETIRING,
    (S.SERVING, "halt"): S.RETIRING,
    (S.RETIRING, "halt"): S.RETIRING,
    (S.STARTING, "hung"): S.ABORTING,
    (S.SERVING, "hung"): S.ABORTING,
    (S.RETIRING, "hung"): S.ABORTING,
}


@dataclass(eq=False)
class Worker:
    number: int  # its slot's number (a replacement gets the number of the worker it replaces)
    generation: int  # bumped by every reload
    spawned_at: float
    requests_limit: int = 0  # recycle after this many requests (0: never)
    lifetime_limit: float = 0.0  # recycle this long after ready (0: never)
    pid: int | None = None  # None until ``started``
    state: State = State.STARTING
    ready_at: float | None = None
    last_seen: float = 0.0
    requests: int = 0  # served so far, from its heartbeats
    deadline: float | None = None  # RETIRING / ABORTING: SIGKILL after this
    killed: bool = False
    reason: Reason | None = None  # why it is being replaced, or why it left
    why: str = ""  # the same in words, for the log
    memory: int | None = None  # the last USS sample, bytes
    memory_over: int = 0  # consecutive samples above --max-memory
    exited_at: float | None = None
    status: str = ""  # how it ended ("exited with code 0")
    fields: dict[str, str] = field(default_factory=dict)  # the last heartbeat's other fields
    pending_signals: list[int] = field(default_factory=list)  # sent once it has a pid

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.pid})" if self.pid is not None else f"worker {self.number}"


@dataclass(eq=False)
class Slot:
    number: int
    current: Worker | None = None
    successor: Worker | None = None
    failures: int = 0  # consecutive starts that never became ready, or crashes
    next_spawn_at: float = 0.0


@dataclass
class Totals:
    """Sums over every worker that has exited (the live ones are in ``Policy.workers``)."""

    requests: int = 0
    restarts: Counter[str] = field(default_factory=Counter)  # Reason.value -> count
    spawned: int = 0


# -- actions: what the loop does for the policy ------------------------------------------------


@dataclass(frozen=True, eq=False)
class Spawn:
    """Start ``worker`` (fork); answer with ``started`` or ``start_failed``."""

    worker: Worker


@dataclass(frozen=True)
class Signal:
    pid: int
    signum: int


@dataclass(frozen=True)
class Notify:
    """Tell systemd (sd_notify fields)."""

    fields: tuple[str, ...]


@dataclass(frozen=True, eq=False)
class Measure:
    """Sample these workers' USS; answer with ``memory``."""

    workers: tuple[Worker, ...]


@dataclass(frozen=True)
class ReopenLogs:
    """Reopen the master's own log files (SIGUSR1 goes to ``forwarded`` workers too)."""

    forwarded: int


Action = Spawn | Signal | Notify | Measure | ReopenLogs


def backoff(failures: int) -> float:
    """Delay before respawning after ``failures`` failures in a row: the first respawn is
    immediate (a one-off crash should cost no capacity), then 0.1 s doubling up to 10 s."""
    return 0.0 if failures <= 1 else min(MAX_BACKOFF, 0.1 * 2 ** (failures - 2))


def describe_status(status: int) -> str:
    """A wait status in words: "exited with code 1", "was killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


class Policy:
    def __init__(
        self,
        config: SupervisorConfig,
        *,
        workers: int | None = None,
        mainpid: int = 0,
        logger: logging.Logger | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.mainpid = mainpid  # the master's pid, for systemd's MAINPID=
        self.log = logger or logging.getLogger("supervisor")
        self.rng = rng or random.Random()
        self.phase = Phase.STARTING
        self.generation = 1
        count = config.resolved_workers() if workers is None else workers
        self.slots: dict[int, Slot] = {n: Slot(n) for n in range(1, count + 1)}
        self.workers: list[Worker] = []  # every live worker, in or out of a slot
        self.history: deque[Worker] = deque(maxlen=EXITED_KEPT)  # the last workers that exited
        self.totals = Totals()
        self.exit_code = EXIT_OK
        self.ever_ready = False
        self.stop_deadline: float | None = None
        self.rotate_at_once = config.resolved_rotate_at_once(count)
        self._actions: list[Action] = []
        self._next_memory_at = 0.0
        self._next_status_at = 0.0
        self._last_status = ""

    # ------------------------------------------------------------------ outputs

    def take(self) -> list[Action]:
        """The actions queued since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    @property
    def stopping(self) -> bool:
        return self.phase in (Phase.STOPPING, Phase.HALTING)

    @property
    def finished(self) -> bool:
        """Stopping, and every worker has exited: the master can return ``exit_code``."""
        return self.stopping and not self.workers

    def next_deadline(self, now: float) -> float:
        """When the policy next wants a ``tick`` (at the latest a second from now)."""
        cfg = self.config
        deadlines = [now + 1.0]
        for worker in self.workers:
            if worker.state is State.STARTING:
                deadlines.append(worker.spawned_at + cfg.startup_timeout)
            elif worker.state is State.SERVING:
                deadlines.append(worker.last_seen + cfg.timeout_worker)
                if worker.lifetime_limit and worker.ready_at is not None:
                    deadlines.append(worker.ready_at + worker.lifetime_limit)
            elif worker.deadline is not None and not worker.killed:
                deadlines.append(worker.deadline)
        if not self.stopping:
            deadlines.extend(s.next_spawn_at for s in self.slots.values() if s.current is None)
            if cfg.max_memory:
                deadlines.append(self._next_memory_at)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        return min(deadlines)

    def worker(self, pid: int) -> Worker | None:
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        return None

    def attached(self) -> list[Worker]:
        """The workers in slots (current and successors)."""
        return [w for s in self.slots.values() for w in (s.current, s.successor) if w is not None]

    def requests_served(self) -> int:
        """Requests served by every worker, past and present."""
        return self.totals.requests + sum(w.requests for w in self.workers)

    def status_text(self) -> str:
        serving = sum(1 for w in self.attached() if w.state is State.SERVING)
        text = f"{serving} of {len(self.slots)} workers serving, {self.requests_served()} requests served"
        if self.phase is Phase.RELOADING:
            text += ", reloading"
        return text

    # ------------------------------------------------------------------ inputs from the loop

    def start(self, now: float) -> None:
        self.tick(now)

    def started(self, worker: Worker, pid: int, now: float) -> None:
        """The fork for ``worker`` succeeded."""
        worker.pid = pid
        self.log.debug("Started %s (generation %d).", worker.describe(), worker.generation)
        for signum in worker.pending_signals:
            self._act(Signal(pid, signum))
        worker.pending_signals.clear()

    def start_failed(self, worker: Worker, why: str, now: float) -> None:
        """``worker`` could not be started at all (fork failed): it never existed."""
        self.log.error("Cannot start %s: %s.", worker.describe(), why)
        self._forget(worker)
        worker.reason, worker.why, worker.status = Reason.CRASH, why, why
        self._record_exit(worker, now)
        self._never_ready(worker, why, why, now)

    def message(self, worker: Worker, message: Message, now: float) -> None:
        worker.last_seen = now
        if message.kind == HEARTBEAT:
            self._count(worker, message.requests or 0)
            if message.fields:
                worker.fields.update(message.fields)
        elif message.kind == READY:
            self._transition(worker, "ready", now)
        elif message.kind == RETIRING:
            self._transition(worker, "retiring", now)

    def exited(self, worker: Worker, status: int, now: float) -> None:
        """``worker`` was reaped with wait status ``status`` (its channel already drained)."""
        self._forget(worker)
        how = worker.status = describe_status(status)
        if worker.state is State.RETIRING:
            self.log.info("%s %s after retiring (%d request(s) served).", worker.describe().capitalize(), how,
                          worker.requests)
            if worker.reason is None:
                worker.reason = Reason.STOP if self.stopping else Reason.EXIT
            self._record_exit(worker, now)
            return
        if worker.state is State.ABORTING:
            self.log.warning("%s %s after it was found hung.", worker.describe().capitalize(), how)
            self._record_exit(worker, now)
            return
        worker.reason, worker.why = Reason.CRASH, how
        if self.stopping:
            self.log.info("%s %s.", worker.describe().capitalize(), how)
            worker.reason = Reason.STOP
            self._record_exit(worker, now)
            return
        self._record_exit(worker, now)
        if worker.state is State.STARTING:
            self.log.error("%s %s before it was ready.", worker.describe().capitalize(), how)
            self._never_ready(worker, f"{how} before it was ready", how, now)
            return
        self.log.error("%s %s unexpectedly; starting a new one.", worker.describe().capitalize(), how)
        self._detach(worker, now, failure=True)
        self._check_crash_loop(worker, how, now)

    def memory(self, samples: dict[Worker, int | None], now: float) -> None:
        """USS samples (bytes, None when unknown) for the workers ``Measure`` named."""
        cfg = self.config
        limit = cfg.max_memory * 1024 * 1024
        for worker, used in samples.items():
            worker.memory = used
            if worker.state is not State.SERVING or worker not in self.workers or used is None:
                continue
            if used > HARD_MEMORY_FACTOR * limit:
                # A fast leak outruns "replacement first": stop feeding it now. New connections
                # wait in the kernel backlog for the other workers or the replacement.
                self.log.warning(
                    "Retiring %s at once: it uses %.0f MiB, over %g times its limit of %g MiB.",
                    worker.describe(), used / 1048576, HARD_MEMORY_FACTOR, cfg.max_memory,
                )
                if worker.reason is None:
                    worker.reason, worker.why = Reason.MAX_MEMORY, f"uses {used / 1048576:.0f} MiB"
                self._transition(worker, "retire", now)
                continue
            worker.memory_over = worker.memory_over + 1 if used > limit else 0
            if worker.reason is None and worker.memory_over >= cfg.memory_samples:
                self._replace(worker, Reason.MAX_MEMORY, f"uses {used / 1048576:.0f} MiB, limit {cfg.max_memory:g} MiB")
        self._reconcile(now)

    def command(self, signum: int, now: float) -> None:
        """A signal to the master."""
        if signum == signal.SIGTERM:
            self._begin_stop(now, halting=False, why="SIGTERM")
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            if self.phase is Phase.HALTING and signum == signal.SIGINT:
                self.log.warning("Second SIGINT: killing the workers now.")
                self._kill_all()
            else:
                self._begin_stop(now, halting=True, why=signal.Signals(signum).name)
        elif self.stopping:
            return  # no reloads or resizing while stopping
        elif signum == signal.SIGHUP:
            self.reload("SIGHUP", now)
        elif signum == signal.SIGTTIN:
            self._resize(+1, now)
        elif signum == signal.SIGTTOU:
            self._resize(-1, now)
        elif signum == signal.SIGUSR1:
            self._act(ReopenLogs(len(self.workers)))
            for worker in self.workers:
                self._signal(worker, signal.SIGUSR1)

    def reload(self, why: str, now: float) -> None:
        """Replace every worker with one on the new code (rolling; old ones serve until then)."""
        if self.stopping:
            return
        self.generation += 1
        flagged = 0
        for worker in self.attached():
            if worker.generation < self.generation:
                worker.reason, worker.why = Reason.RELOAD, why
                flagged += 1
        self.log.info("Reloading (%s): replacing %d worker(s), %d at a time.", why, flagged, self.rotate_at_once)
        if self.phase in (Phase.RUNNING, Phase.RELOADING):
            self.phase = Phase.RELOADING
            # systemd wants CLOCK_MONOTONIC in microseconds: the clock ``now`` comes from.
            self._act(Notify(("RELOADING=1", f"MONOTONIC_USEC={int(now * 1_000_000)}", "STATUS=Reloading")))

    def tick(self, now: float) -> None:
        cfg = self.config
        for worker in list(self.workers):
            if worker.state is State.STARTING and now - worker.spawned_at > cfg.startup_timeout:
                self._transition(worker, "hung", now, f"did not become ready within {cfg.startup_timeout:g} s")
            elif worker.state is State.SERVING and now - worker.last_seen > cfg.timeout_worker:
                self._transition(worker, "hung", now, f"sent no heartbeat for {cfg.timeout_worker:g} s")
            elif worker.deadline is not None and now >= worker.deadline and not worker.killed:
                if worker.state is State.RETIRING:
                    self.log.warning("%s did not finish retiring in time; killing it.", worker.describe().capitalize())
                worker.killed = True
                self._signal(worker, signal.SIGKILL)
        if self.stopping:
            if self.stop_deadline is not None and now >= self.stop_deadline and self.workers:
                self.log.warning("%d worker(s) did not stop in time; killing them.", len(self.workers))
                self._kill_all()
                self.stop_deadline = None
            return
        self._check_budgets(now)
        if cfg.max_memory and now >= self._next_memory_at:
            self._next_memory_at = now + cfg.memory_interval
            serving = tuple(w for w in self.attached() if w.state is State.SERVING)
            if serving:
                self._act(Measure(serving))
        self._reconcile(now)
        self._notify_status(now)

    # ------------------------------------------------------------------ decisions

    def _check_budgets(self, now: float) -> None:
        for worker in self.attached():
            if worker.state is not State.SERVING or worker.reason is not None:
                continue
            if worker.requests_limit and worker.requests >= worker.requests_limit:
                self._replace(worker, Reason.MAX_REQUESTS,
                              f"served {worker.requests} requests, limit {worker.requests_limit}")
            elif worker.lifetime_limit and worker.ready_at is not None and now - worker.ready_at >= worker.lifetime_limit:
                self._replace(worker, Reason.MAX_LIFETIME,
                              f"lived {now - worker.ready_at:.0f} s, limit {worker.lifetime_limit:.0f} s")

    def _replace(self, worker: Worker, reason: Reason, why: str) -> None:
        worker.reason, worker.why = reason, why
        self.log.info("Recycling %s: %s; starting its replacement first.", worker.describe(), why)

    def _reconcile(self, now: float) -> None:
        """Fill empty slots; start successors for workers that are to be replaced."""
        if self.stopping:
            return
        for slot in self.slots.values():
            if slot.current is None and now >= slot.next_spawn_at:
                slot.current = self._spawn(slot, now)
        in_flight = sum(1 for s in self.slots.values() if s.successor is not None)
        for slot in self.slots.values():
            if in_flight >= self.rotate_at_once:
                break
            current = slot.current
            if (
                current is not None and current.state is State.SERVING and current.reason is not None
                and slot.successor is None and now >= slot.next_spawn_at
            ):
                slot.successor = self._spawn(slot, now)
                in_flight += 1
        self._update_phase()

    def _spawn(self, slot: Slot, now: float) -> Worker:
        cfg = self.config
        requests_limit = lifetime_limit = 0
        if cfg.max_requests > 0:
            requests_limit = cfg.max_requests + self.rng.randint(0, max(0, cfg.max_requests_jitter))
        if cfg.max_lifetime > 0:
            lifetime_limit = cfg.max_lifetime + self.rng.uniform(0, max(0.0, cfg.max_lifetime_jitter))
        worker = Worker(
            number=slot.number, generation=self.generation, spawned_at=now, last_seen=now,
            requests_limit=requests_limit, lifetime_limit=lifetime_limit,
        )
        self.workers.append(worker)
        self.totals.spawned += 1
        self._act(Spawn(worker))
        return worker

    def _update_phase(self) -> None:
        if self.phase is Phase.STARTING:
            if all(s.current is not None and s.current.state is State.SERVING for s in self.slots.values()):
                reloading = any(w.reason is Reason.RELOAD for w in self.attached())
                self.phase = Phase.RELOADING if reloading else Phase.RUNNING
                self.log.info("Ready: %d worker(s) serving.", len(self.slots))
                self._act(Notify(("READY=1", f"MAINPID={self.mainpid}", f"STATUS={self.status_text()}")))
        elif self.phase is Phase.RELOADING:
            done = all(
                s.successor is None and s.current is not None and s.current.state is State.SERVING
                and s.current.generation == self.generation
                for s in self.slots.values()
            )
            if done:
                self.phase = Phase.RUNNING
                self.log.info("Reload complete: %d worker(s) serving the new code.", len(self.slots))
                self._act(Notify(("READY=1", f"STATUS={self.status_text()}")))

    def _notify_status(self, now: float) -> None:
        if self.phase is not Phase.STARTING and now >= self._next_status_at:
            text = self.status_text()
            if text != self._last_status:
                self._act(Notify((f"STATUS={text}",)))
                self._last_status = text
                self._next_status_at = now + self.config.status_interval

    def _resize(self, delta: int, now: float) -> None:
        if delta > 0:
            number = 1
            while number in self.slots:
                number += 1
            self.slots[number] = Slot(number)
            self.log.info("SIGTTIN: adding worker %d (%d workers).", number, len(self.slots))
            self._reconcile(now)
            return
        if len(self.slots) <= 1:
            self.log.warning("SIGTTOU ignored: at least one worker must remain.")
            return
        number = max(self.slots)
        slot = self.slots[number]
        self.log.info("SIGTTOU: removing worker %d (%d workers).", number, len(self.slots) - 1)
        for worker in (slot.successor, slot.current):
            if worker is not None:
                worker.reason, worker.why = Reason.SCALE, "SIGTTOU"
                self._transition(worker, "retire", now)
        del self.slots[number]

    def _begin_stop(self, now: float, *, halting: bool, why: str | None, bound: float | None = None) -> None:
        if self.phase is Phase.HALTING or (self.phase is Phase.STOPPING and not halting):
            return
        if why:
            self.log.info("%s: %s.", why, "quick stop" if halting else "graceful stop")
        self.phase = Phase.HALTING if halting else Phase.STOPPING
        self._act(Notify(("STOPPING=1", "STATUS=Stopping")))
        bound = self.config.graceful_timeout if bound is None else bound
        self.stop_deadline = now + bound + self.config.stop_margin
        for worker in list(self.workers):
            self._transition(worker, "halt" if halting else "stop", now)

    def _kill_all(self) -> None:
        for worker in self.workers:
            worker.killed = True
            self._signal(worker, signal.SIGKILL)

    # ------------------------------------------------------------------ the one place for state changes

    def _transition(self, worker: Worker, event: str, now: float, why: str = "") -> None:
        new = TRANSITIONS.get((worker.state, event))
        if new is None:
            return  # e.g. "ready" from a worker we already retire: nothing changes
        old, worker.state = worker.state, new
        cfg = self.config
        slot = self.slots.get(worker.number)
        if event == "ready":
            worker.ready_at = worker.last_seen = now
            self.ever_ready = True
            if slot is not None:
                slot.failures = 0
                if slot.successor is worker:
                    predecessor = slot.current
                    slot.current, slot.successor = worker, None
                    if predecessor is not None:
                        self.log.info(
                            "%s is ready; retiring %s: %s.", worker.describe().capitalize(),
                            predecessor.describe(), predecessor.why or "replaced",
                        )
                        self._transition(predecessor, "retire", now)
                elif slot.current is worker:
                    self.log.info("%s is ready.", worker.describe().capitalize())
        elif event == "retire":
            self._detach(worker, now)
            self._signal(worker, signal.SIGTERM)
            worker.deadline = now + cfg.graceful_timeout + cfg.stop_margin
        elif event == "retiring":
            # The worker leaves on its own: its slot is refilled at once, no backoff.
            self.log.info("%s is retiring on its own.", worker.describe().capitalize())
            self._detach(worker, now)
            worker.deadline = now + cfg.graceful_timeout + cfg.stop_margin
            if slot is not None:
                slot.next_spawn_at = now
        elif event == "stop":
            self._signal(worker, signal.SIGTERM)
        elif event == "halt":
            self._signal(worker, signal.SIGQUIT)  # the workers' "quick stop"
        elif event == "hung":
            self.log.error("%s %s; sending SIGABRT, then SIGKILL.", worker.describe().capitalize(), why)
            if old is not State.RETIRING:  # a retiring worker keeps the reason it was replaced for
                worker.reason, worker.why = Reason.HUNG, why
            failed_start = old is State.STARTING
            if failed_start:
                self._start_failed(worker, why)
            self._detach(worker, now, failure=True)
            self._signal(worker, signal.SIGABRT)
            worker.deadline = now + cfg.abort_grace
            if failed_start:
                self._check_crash_loop(worker, why, now)

    # ------------------------------------------------------------------ helpers

    def _act(self, action: Action) -> None:
        self._actions.append(action)

    def _signal(self, worker: Worker, signum: int) -> None:
        if worker.pid is None:
            worker.pending_signals.append(signum)
        else:
            self._act(Signal(worker.pid, signum))

    def _count(self, worker: Worker, requests: int) -> None:
        """A request count from the worker (a late one may arrive after it exited)."""
        if requests > worker.requests:
            if worker.exited_at is not None:
                self.totals.requests += requests - worker.requests
            worker.requests = requests

    def _forget(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)

    def _record_exit(self, worker: Worker, now: float) -> None:
        worker.exited_at = now
        self.history.append(worker)
        self.totals.requests += worker.requests
        if worker.reason is not None and worker.reason is not Reason.STOP:
            self.totals.restarts[worker.reason.value] += 1

    def _detach(self, worker: Worker, now: float, failure: bool = False) -> None:
        """Take the worker out of its slot (it stays in ``workers`` until it exits)."""
        slot = self.slots.get(worker.number)
        if slot is None:
            return
        if slot.successor is worker:
            slot.successor = None
        elif slot.current is worker:
            slot.current, slot.successor = slot.successor, None
        else:
            return
        if failure:
            slot.failures += 1
            slot.next_spawn_at = now + backoff(slot.failures)

    def _never_ready(self, worker: Worker, why: str, how: str, now: float) -> None:
        self._start_failed(worker, why)
        self._detach(worker, now, failure=True)
        self._check_crash_loop(worker, how, now)

    def _start_failed(self, worker: Worker, why: str) -> None:
        """A worker never became ready. If it was meant to replace a reloaded worker, stop the reload."""
        slot = self.slots.get(worker.number)
        if slot is None or slot.successor is not worker or slot.current is None:
            return
        if slot.current.reason is Reason.RELOAD and self.phase is Phase.RELOADING:
            self.log.error("Reload failed: the new %s %s; the previous workers keep serving.", worker.describe(), why)
            for other in self.attached():
                if other.reason is Reason.RELOAD:
                    other.reason, other.why = None, ""
            self.phase = Phase.RUNNING
            self._act(Notify(("READY=1", f"STATUS=Reload failed: new worker {why}; previous workers still serving.")))
        else:
            self.log.error(
                "The replacement for %s %s; %s keeps serving and will be replaced later.",
                slot.current.describe(), why, slot.current.describe(),
            )

    def _check_crash_loop(self, worker: Worker, how: str, now: float) -> None:
        slot = self.slots.get(worker.number)
        if self.ever_ready or slot is None or slot.failures < self.config.startup_attempts:
            return
        self.log.error(
            "Workers keep failing before they are ready (worker %d %s, %d attempts in a row); "
            "stopping. See the worker's error above.", worker.number, how, slot.failures,
        )
        self.exit_code = EXIT_STARTUP_FAILED
        self._begin_stop(now, halting=False, why=None, bound=min(self.config.graceful_timeout, 5.0))
