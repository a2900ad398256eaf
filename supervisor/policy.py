"""The supervisor's decisions: which worker to start, retire or signal, and when.

Rules this module keeps
-----------------------
1. No I/O and no clock. The policy never forks, signals, reads a pipe or the time: every input
   is an event that carries the time it happened (``now``, monotonic seconds), every output is
   an action (``Spawn``, ``StartTemplate``, ``Signal``, ``Notify``, ``Measure``, ``ReopenLogs``)
   that the master's loop applies. Tests drive it with a fake clock and fake events, without processes.
2. One place for state changes: ``_transition`` applies ``TRANSITIONS``; no other code assigns
   ``Worker.state`` (templates: ``_template_transition`` and ``TEMPLATE_TRANSITIONS``).
3. Capacity first. A worker that has to go for a planned reason (reload, max requests, max
   lifetime, max memory) is retired only after its replacement has reported ``ready``. Only a
   crash or a hang loses capacity, and only until the respawn. (One exception: a worker above
   twice its --max-memory is retired at once; its connections wait in the kernel backlog.)
4. Hard budgets. A worker's replacement for --max-requests or --max-lifetime is started
   ahead of time (the worker says ``nearing`` from its request rate; the lifetime is known),
   ``lead`` seconds early: three times the measured boot time plus a margin. Once the
   replacement is ready the old worker is FINISHING: it stops at its budget (the handover
   signal makes it leave the moment it has served its limit) or at its lifetime, and no
   later than ``handover_grace`` after the handover. A worker that keeps its budget
   (``supervisor.budget``) stops accepting at its limit even when its replacement is late: it
   says ``holding`` and is HOLDING (it accepts nothing; the process stays) until the
   replacement is ready (then it is retired: it never held a slot's capacity alone for long)
   or cannot start: then it is told to serve on (SERVE_ON_SIGNAL), and serves past its
   limit until a replacement is ready (rule 7). A HOLDING worker is never left without a
   replacement on the way: with none (a backoff, no template to fork from) it serves on.
5. Never many at once: at most ``rotate_at_once`` reload and memory replacements are in
   flight. Budget replacements start when due (the jitter settings spread them).
6. Every timer is a deadline; ``next_deadline`` says when the policy next wants a ``tick``.
7. A broken deploy never takes the service down: a replacement that fails to start aborts the
   reload and the old workers keep serving; a worker holding at its budget serves on.
8. Nothing is forgotten at exit: a worker that exits leaves a record (requests served, why it
   left, how it ended) in ``history`` and in the ``totals`` (with its last heartbeat's
   counter fields, ``supervisor.metrics``), so counters summed over the fleet never go
   backwards when a worker is replaced.
9. With --preload, workers are forked from a template (``supervisor.forkserver``): a worker is
   spawned only from a READY template, and a reload's successors only from the reload's own
   template. A reload starts a new template first; the reload goes on once it is ready, and if
   it dies first the reload fails and the old template keeps forking. A template that dies is
   restarted with backoff (the workers serve on); one that never becomes ready at startup,
   ``startup_attempts`` times in a row, is a crash loop (exit code 3).

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

    STARTING --ready-------> SERVING          (successor ready: its predecessor gets "handover"
                                               for a budget it has not reached, "retire" else)
    SERVING --handover--> FINISHING           (out of its slot; serves on until its budget,
                                               its lifetime or the handover grace)
    SERVING --holding--> HOLDING              (the worker is at its budget, its replacement is
                                               not ready: it accepts nothing and waits)
    SERVING/HOLDING --serve_on--> SERVING     (its replacement could not start: SERVE_ON_SIGNAL)
    live --retire--> RETIRING                 (we send SIGHUP; deadline = graceful bound)
    live --retiring--> RETIRING               (the worker said it is leaving on its own)
    live --stop--> RETIRING                   (the master stops gracefully: SIGTERM)
    live/RETIRING --halt--> RETIRING          (the master stops quickly: SIGQUIT)
    live/RETIRING --hung--> ABORTING          (SIGABRT; abort grace, then SIGKILL)
    any --exit (reaped)--> gone               (``exited``: crash accounting, backoff, respawn)

(live: STARTING, SERVING, HOLDING, FINISHING.)

Templates (with --preload)::

    STARTING --ready--> READY --stop--> STOPPING   (stop: replaced by a reload's template, or the
    STARTING --stop--> STOPPING                     master stops; SIGTERM)
    any --exit (reaped)--> gone                    (a reload's template: the reload fails; the
                                                    last ready one: restarted with backoff)

Master phases::

    STARTING  --all slots serving--> RUNNING    (systemd: READY=1)
    RUNNING   --HUP / file change--> RELOADING  (RELOADING=1 ... READY=1 when every slot runs the
                                                 new generation, or the reload failed)
    any       --TERM--> STOPPING                (STOPPING=1; workers get TERM; bounded). With
                                                 shutdown_delay: ``draining`` (not ``ready``) at
                                                 once, STOPPING when the delay is over or at a
                                                 second TERM
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

from supervisor.budget import lead_time
from supervisor.channel import HEARTBEAT, HOLDING, NEARING, READY, RETIRING, Message
from supervisor.child import HANDOVER_SIGNAL, REPORT_SIGNAL, RETIRE_SIGNAL, SERVE_ON_SIGNAL
from supervisor.config import EXIT_OK, EXIT_STARTUP_FAILED, SupervisorConfig
from supervisor.metrics import add as add_counters

MAX_BACKOFF = 10.0
# --max-memory: above this multiple of the limit a worker is retired without waiting for its
# replacement (rule 3's one exception: a runaway leak must not take the machine down).
HARD_MEMORY_FACTOR = 2.0
# How many exited workers' records are kept (the totals cover all of them).
EXITED_KEPT = 64
# A FINISHING worker that has not reached its request budget this long after the handover
# (at least; four times the time it said it might need) is retired anyway: traffic dropped.
HANDOVER_GRACE = 2.0
HANDOVER_ETA_FACTOR = 4.0
BOOTS_KEPT = 8  # recent boot times (spawn to ready) behind the fleet's boot estimate
# The loop ticks at least once a second (next_deadline). A longer gap means the master itself
# did not run: the process group stopped and continued (Ctrl-Z then fg, SIGSTOP), a frozen
# cgroup (docker pause). The workers were most likely stopped with it, so their silence
# during the gap is not held against them (else every worker is aborted as hung at once).
STALL = 2.0


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    HOLDING = "holding"  # at its budget, its replacement not ready: accepts nothing, waits
    FINISHING = "finishing"  # replaced: serves until its budget or lifetime, then retires
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
LIVE = (S.STARTING, S.SERVING, S.HOLDING, S.FINISHING)
RUNNING = (S.SERVING, S.HOLDING, S.FINISHING)  # ready once, not leaving: heartbeats expected
BUDGETS = (Reason.MAX_REQUESTS, Reason.MAX_LIFETIME)
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.STARTING, "ready"): S.SERVING,
    (S.SERVING, "handover"): S.FINISHING,
    (S.SERVING, "holding"): S.HOLDING,
    (S.SERVING, "serve_on"): S.SERVING,
    (S.HOLDING, "serve_on"): S.SERVING,
    **{(state, "retire"): S.RETIRING for state in LIVE},
    **{(state, "retiring"): S.RETIRING for state in LIVE},
    **{(state, "stop"): S.RETIRING for state in LIVE},
    **{(state, "halt"): S.RETIRING for state in (*LIVE, S.RETIRING)},
    **{(state, "hung"): S.ABORTING for state in (*LIVE, S.RETIRING)},
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
    retire_at: float | None = None  # FINISHING: retire at this time if still serving
    eta: float | None = None  # its last "nearing": seconds to its budget, as it estimated
    served_on: bool = False  # told to serve on past its budget (its replacement failed)
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

    @property
    def boot_time(self) -> float:
        """Spawn to ready, seconds (0 until ready)."""
        return self.ready_at - self.spawned_at if self.ready_at is not None else 0.0

    @property
    def lifetime_end(self) -> float | None:
        if not self.lifetime_limit or self.ready_at is None:
            return None
        return self.ready_at + self.lifetime_limit


class TemplateState(enum.Enum):
    STARTING = "starting"  # loading the application
    READY = "ready"  # forks workers
    STOPPING = "stopping"  # replaced, or the master stops: SIGTERM sent


T = TemplateState
TEMPLATE_TRANSITIONS: dict[tuple[TemplateState, str], TemplateState] = {
    (T.STARTING, "ready"): T.READY,
    (T.STARTING, "stop"): T.STOPPING,
    (T.READY, "stop"): T.STOPPING,
}


@dataclass(eq=False)
class Template:
    """With --preload: a process that loaded the application once; workers are forked from it."""

    generation: int  # the code it loaded: its workers get this generation
    spawned_at: float
    pid: int | None = None  # None until ``template_started``
    state: TemplateState = TemplateState.STARTING
    ready_at: float | None = None
    killed: bool = False

    def describe(self) -> str:
        return f"template (pid {self.pid})" if self.pid is not None else "template"


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
    counters: dict[str, list[float]] = field(default_factory=dict)  # config.counter_fields, summed


# -- actions: what the loop does for the policy ------------------------------------------------


@dataclass(frozen=True, eq=False)
class Spawn:
    """Start ``worker`` (fork); answer with ``started`` or ``start_failed``."""

    worker: Worker
    boot_estimate: float = 0.0  # the fleet's recent boot time, for the worker's context
    template: Template | None = None  # fork it from this template (--preload), else from the master
    rate_estimate: float = 0.0  # the highest request rate of recent workers (requests/s; 0: unknown)


@dataclass(frozen=True, eq=False)
class StartTemplate:
    """Start ``template`` (fork; it loads the app); answer with ``template_started``, then
    ``template_ready`` or ``template_exited``."""

    template: Template


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


Action = Spawn | StartTemplate | Signal | Notify | Measure | ReopenLogs


def _rotated(worker: Worker | None) -> bool:
    """Replacements limited by rotate_at_once: reload and memory (budgets start when due)."""
    return worker is not None and worker.reason in (Reason.RELOAD, Reason.MAX_MEMORY)


def _budget_spent(worker: Worker, now: float) -> bool:
    """Past the budget it is being replaced for (requests served, or lifetime)."""
    if worker.reason is Reason.MAX_REQUESTS:
        return worker.requests >= worker.requests_limit > 0
    end = worker.lifetime_end
    return worker.reason is Reason.MAX_LIFETIME and end is not None and now >= end


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


REASONS = {reason.value for reason in Reason}


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
        self.stop_at: float | None = None  # SIGTERM with --shutdown-delay: the graceful stop begins then
        self.rotate_at_once = config.resolved_rotate_at_once(count)
        self._actions: list[Action] = []
        self._boots: deque[float] = deque(maxlen=BOOTS_KEPT)
        self._rates: deque[float] = deque(maxlen=BOOTS_KEPT)  # requests/s of recent workers, at exit
        self._next_memory_at = 0.0
        self._ticked_at: float | None = None
        self._next_status_at = 0.0
        self._last_status = ""
        # --preload: the templates (the last one READY forks the workers) and, after one died,
        # when the next one starts.
        self.preloading = config.preload is not None
        self.templates: list[Template] = []
        self.template_failures = 0
        self.ever_template_ready = False
        self._next_template_at: float | None = 0.0 if self.preloading else None

    # ------------------------------------------------------------------ outputs

    def take(self) -> list[Action]:
        """The actions queued since the last call, in order."""
        actions, self._actions = self._actions, []
        return actions

    @property
    def stopping(self) -> bool:
        return self.phase in (Phase.STOPPING, Phase.HALTING)

    @property
    def draining(self) -> bool:
        """SIGTERM was received (the workers may still serve out --shutdown-delay)."""
        return self.stop_at is not None or self.stopping

    @property
    def ready(self) -> bool:
        """At least one worker serves and the master is not draining (a readiness probe). A
        HOLDING worker counts: its replacement is on the way, and new connections wait for it
        in the listen backlog (a probe that flapped for those milliseconds would do harm)."""
        return not self.draining and any(w.state in RUNNING for w in self.workers)

    @property
    def finished(self) -> bool:
        """Stopping, and every worker has exited: the master can return ``exit_code``."""
        return self.stopping and not self.workers and not self.templates

    def next_deadline(self, now: float) -> float:
        """When the policy next wants a ``tick`` (at the latest a second from now)."""
        cfg = self.config
        deadlines = [now + 1.0]
        for worker in self.workers:
            if worker.state is State.STARTING:
                deadlines.append(worker.spawned_at + cfg.startup_timeout)
            elif worker.state in RUNNING:
                deadlines.append(worker.last_seen + cfg.timeout_worker)
                if worker.retire_at is not None:
                    deadlines.append(worker.retire_at)
                end = worker.lifetime_end
                if end is not None and worker.reason is None:
                    deadlines.append(end - self.lead(worker))
            elif worker.deadline is not None and not worker.killed:
                deadlines.append(worker.deadline)
        for template in self.templates:
            if template.state is TemplateState.STARTING:
                deadlines.append(template.spawned_at + cfg.startup_timeout)
        if not self.stopping:
            deadlines.extend(s.next_spawn_at for s in self.slots.values() if s.current is None)
            if self._next_template_at is not None:
                deadlines.append(self._next_template_at)
            if cfg.max_memory:
                deadlines.append(self._next_memory_at)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if self.stop_at is not None and not self.stopping:
            deadlines.append(self.stop_at)
        return min(deadlines)

    def boot_estimate(self) -> float:
        """The longest recent boot (spawn to ready) of a worker, seconds; 0 before any."""
        return max(self._boots, default=0.0)

    def rate_estimate(self) -> float:
        """The highest request rate (requests per second served) of the workers that exited
        recently; 0 before any. A new worker plans its budget with it before it has measured
        its own (a budget that lasts less than the measuring window would be asked for late)."""
        return max(self._rates, default=0.0)

    def lead(self, worker: Worker) -> float:
        """How long before its lifetime ends a worker's replacement is started."""
        return lead_time(worker.boot_time, self.boot_estimate())

    def worker(self, pid: int) -> Worker | None:
        for worker in self.workers:
            if worker.pid == pid:
                return worker
        return None

    def template(self, pid: int) -> Template | None:
        return next((t for t in self.templates if t.pid == pid), None)

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

    def _excuse(self, gap: float, now: float) -> None:
        """The master did not run for ``gap`` seconds: move the heartbeat and startup clocks on
        by as much (never past now)."""
        self.log.warning("The master did not run for %.1f s (stopped or frozen); the workers' "
                         "heartbeats are awaited anew.", gap)
        for worker in self.workers:
            worker.last_seen = min(now, worker.last_seen + gap)
            if worker.state is State.STARTING:
                worker.spawned_at = min(now, worker.spawned_at + gap)
        for template in self.templates:
            if template.state is TemplateState.STARTING:
                template.spawned_at = min(now, template.spawned_at + gap)

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

    def template_started(self, template: Template, pid: int, now: float) -> None:
        """The fork for ``template`` succeeded."""
        template.pid = pid
        if template.state is TemplateState.STOPPING:  # stopped before it had a pid
            self._act(Signal(pid, signal.SIGTERM))

    def template_ready(self, template: Template, now: float) -> None:
        """``template`` loaded the application: workers can be forked from it."""
        if template.state is not TemplateState.STARTING:
            return
        self._template_transition(template, "ready", now)
        self._reconcile(now)

    def template_exited(self, template: Template, status: int | None, now: float) -> None:
        """``template`` was reaped (``status``), or could not be started at all (None)."""
        if template in self.templates:
            self.templates.remove(template)
        how = describe_status(status) if status is not None else "could not be started"
        if template.state is TemplateState.STOPPING or self.stopping:
            self.log.info("The %s %s.", template.describe(), how)
            return
        self.template_failures += 1
        if template.state is TemplateState.READY:
            self.log.error("The %s %s; starting a new one (the workers serve on).", template.describe(), how)
        elif template.generation == self.generation and self.phase is Phase.RELOADING and self._fallback():
            self._abandon_reload(f"the new {template.describe()} {how} before it loaded the application", now)
        else:
            self.log.error("The %s %s before it loaded the application.", template.describe(), how)
            if not self.ever_template_ready and self.template_failures >= self.config.startup_attempts:
                self.log.error("The template keeps failing before it loads the application (%d attempts "
                               "in a row); stopping. See its error above.", self.template_failures)
                self.exit_code = EXIT_STARTUP_FAILED
                self._begin_stop(now, halting=False, why=None, bound=min(self.config.graceful_timeout, 5.0))
                return
        if not any(t.state is not TemplateState.STOPPING for t in self.templates):
            self._next_template_at = now + backoff(self.template_failures)

    def message(self, worker: Worker, message: Message, now: float) -> None:
        worker.last_seen = now
        if message.kind == HEARTBEAT:
            self._count(worker, message.requests or 0)
            if message.fields:
                worker.fields.update(message.fields)
        elif message.kind == READY:
            self._transition(worker, "ready", now)
        elif message.kind == NEARING:
            self._count(worker, message.requests or 0)
            self._nearing(worker, message, now)
        elif message.kind == HOLDING:
            self._count(worker, message.requests or 0)
            self._holding(worker, message, now)
        elif message.kind == RETIRING:
            said = message.fields.get("reason")
            if worker.reason is None and said in REASONS:
                worker.reason, worker.why = Reason(said), "said by the worker"
            self._transition(worker, "retiring", now)

    def exited(self, worker: Worker, status: int, now: float) -> None:
        """``worker`` was reaped with wait status ``status`` (its channel already drained)."""
        self._forget(worker)
        how = worker.status = describe_status(status)
        if worker.state is State.RETIRING:
            if worker.reason is None:
                worker.reason = Reason.STOP if self.stopping else Reason.EXIT
            if worker.ready_at is None:  # retired while it imported the app (SIGTTOU, a reload, a stop)
                why = worker.why or ("the master stops" if worker.reason is Reason.STOP else worker.reason.value)
                self.log.info("%s was stopped before it was ready (%s); it %s.", worker.describe().capitalize(), why, how)
            else:
                self.log.info("%s %s after retiring (%d request(s) served).", worker.describe().capitalize(), how,
                              worker.requests)
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
            if worker.state not in RUNNING or worker not in self.workers or used is None:
                continue
            if worker.state is State.FINISHING and used > limit:
                self.log.info("Retiring %s: it uses %.0f MiB, over its limit of %g MiB, and its replacement "
                              "is ready.", worker.describe(), used / 1048576, cfg.max_memory)
                self._transition(worker, "retire", now)
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
                    self._signal(worker, REPORT_SIGNAL)
                self._transition(worker, "retire", now)
                continue
            worker.memory_over = worker.memory_over + 1 if used > limit else 0
            if worker.reason is None and worker.memory_over >= cfg.memory_samples:
                self._replace(worker, Reason.MAX_MEMORY, f"uses {used / 1048576:.0f} MiB, limit {cfg.max_memory:g} MiB")
                self._signal(worker, REPORT_SIGNAL)  # where it grew, while it still holds it
        self._reconcile(now)

    def command(self, signum: int, now: float) -> None:
        """A signal to the master."""
        if signum == signal.SIGTERM:
            delay = self.config.shutdown_delay
            if delay and self.stop_at is None and not self.stopping:
                self.stop_at = now + delay
                self.log.info("SIGTERM: not ready any more; serving %g s more before the graceful stop.", delay)
                self._act(Notify((f"STATUS=Stopping in {delay:g} s",)))
            else:
                self._begin_stop(now, halting=False, why="SIGTERM")
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            if self.phase is Phase.HALTING:  # asked twice to stop quickly: do not wait at all
                self.log.warning("Second %s: killing the workers now.", signal.Signals(signum).name)
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
            for template in self.templates:  # it logs too
                self._signal_template(template, signal.SIGUSR1)
        elif signum == REPORT_SIGNAL:
            self.log.info("%s: asking %d worker(s) for a memory report.", signal.Signals(signum).name, len(self.workers))
            for worker in self.workers:
                self._signal(worker, REPORT_SIGNAL)

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
        if self.preloading:  # the new code is loaded once, in a new template, before any worker
            for template in self.templates:
                if template.state is TemplateState.STARTING:
                    self._template_transition(template, "stop", now)  # superseded
            self._start_template(now)
        if self.phase in (Phase.RUNNING, Phase.RELOADING):
            self.phase = Phase.RELOADING
            # systemd wants CLOCK_MONOTONIC in microseconds: the clock ``now`` comes from.
            self._act(Notify(("RELOADING=1", f"MONOTONIC_USEC={int(now * 1_000_000)}", "STATUS=Reloading")))

    def tick(self, now: float) -> None:
        cfg = self.config
        gap, self._ticked_at = now - (self._ticked_at or now), now
        if gap > STALL:
            self._excuse(gap, now)
        for worker in list(self.workers):
            if worker.state is State.STARTING and now - worker.spawned_at > cfg.startup_timeout:
                self._transition(worker, "hung", now, f"did not become ready within {cfg.startup_timeout:g} s")
            elif worker.state in RUNNING and now - worker.last_seen > cfg.timeout_worker:
                self._transition(worker, "hung", now, f"sent no heartbeat for {cfg.timeout_worker:g} s")
            elif worker.state is State.FINISHING and self._finished_budget(worker, now):
                if worker.reason is Reason.MAX_REQUESTS and worker.requests < worker.requests_limit:
                    self.log.info("Retiring %s: %d of %d requests served, and its replacement has served "
                                  "beside it long enough.", worker.describe(), worker.requests, worker.requests_limit)
                self._transition(worker, "retire", now)
            elif worker.deadline is not None and now >= worker.deadline and not worker.killed:
                if worker.state is State.RETIRING:
                    self.log.warning("%s did not finish retiring in time; killing it.", worker.describe().capitalize())
                worker.killed = True
                self._signal(worker, signal.SIGKILL)
        if self.stopping:
            if self.stop_deadline is not None and now >= self.stop_deadline and (self.workers or self.templates):
                self.log.warning("%d worker(s) did not stop in time; killing them.", len(self.workers))
                self._kill_all()
                self.stop_deadline = None
            return
        if self.stop_at is not None and now >= self.stop_at:
            self._begin_stop(now, halting=False, why="Shutdown delay over")
            return
        for template in list(self.templates):
            if (template.state is TemplateState.STARTING and not template.killed
                    and now - template.spawned_at > cfg.startup_timeout):
                self.log.error("The %s did not load the application within %g s; killing it.",
                               template.describe(), cfg.startup_timeout)
                template.killed = True  # its exit counts as a failure
                self._signal_template(template, signal.SIGKILL)
        if self._next_template_at is not None and now >= self._next_template_at:
            self._next_template_at = None
            self._start_template(now)
        self._check_budgets(now)
        if cfg.max_memory and now >= self._next_memory_at:
            self._next_memory_at = now + cfg.memory_interval
            serving = tuple(w for w in self.workers if w.state in RUNNING)
            if serving:
                self._act(Measure(serving))
        self._reconcile(now)
        self._notify_status(now)

    # ------------------------------------------------------------------ decisions

    def _check_budgets(self, now: float) -> None:
        """Replacements due: a lifetime about to end, or a worker whose heartbeats show it
        past its request budget without having said ``nearing`` (it does not keep budgets)."""
        for worker in self.attached():
            if worker.state is not State.SERVING or worker.reason is not None:
                continue
            end = worker.lifetime_end
            if worker.requests_limit and worker.requests >= worker.requests_limit:
                self._replace(worker, Reason.MAX_REQUESTS,
                              f"served {worker.requests} requests, limit {worker.requests_limit}")
            elif end is not None and now >= end - self.lead(worker):
                self._replace(worker, Reason.MAX_LIFETIME,
                              f"its lifetime of {worker.lifetime_limit:.0f} s ends in {max(0.0, end - now):.1f} s")

    def _finished_budget(self, worker: Worker, now: float) -> bool:
        """A FINISHING worker that should stop now (one that keeps its budget stops itself)."""
        return (worker.retire_at is not None and now >= worker.retire_at) or _budget_spent(worker, now)

    def _nearing(self, worker: Worker, message: Message, now: float) -> None:
        try:
            worker.eta = max(0.0, float(message.fields.get("eta", "0")))
        except ValueError:
            worker.eta = 0.0
        if worker.state is not State.SERVING or worker.reason is not None or worker not in self.attached():
            return
        self._replace(worker, Reason.MAX_REQUESTS,
                      f"{worker.requests} of {worker.requests_limit} requests served, "
                      f"its budget about {worker.eta:.2f} s away")

    def _holding(self, worker: Worker, message: Message, now: float) -> None:
        """The worker reached its budget before its replacement was ready (rule 4)."""
        if worker.served_on or worker.state is not State.SERVING:
            return  # told to serve on meanwhile (it resumed), or already handed over
        reason = Reason.MAX_LIFETIME if message.fields.get("reason") == Reason.MAX_LIFETIME.value else Reason.MAX_REQUESTS
        if worker.reason is None and worker in self.attached():  # it never said "nearing"
            self._replace(worker, reason, f"at its budget ({worker.requests} requests served)")
        self._transition(worker, "holding", now)

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
        in_flight = sum(1 for s in self.slots.values() if s.successor is not None and _rotated(s.current))
        for slot in self.slots.values():
            current = slot.current
            if (
                current is None or current.state not in (State.SERVING, State.HOLDING) or current.reason is None
                or slot.successor is not None or now < slot.next_spawn_at
            ):
                continue
            if self.preloading and current.reason is Reason.RELOAD and self._forking_template(self.generation) is None:
                continue  # the reload's template is not ready yet
            if _rotated(current):
                if in_flight >= self.rotate_at_once:
                    continue
                in_flight += 1
            slot.successor = self._spawn(slot, now)
        for slot in self.slots.values():
            if slot.current is not None and slot.current.state is State.HOLDING and slot.successor is None:
                self._transition(slot.current, "serve_on", now, "no replacement is on the way")
        self._update_phase(now)

    def _spawn(self, slot: Slot, now: float) -> Worker | None:
        """A new worker for ``slot``; None while no template can fork it (--preload)."""
        cfg = self.config
        template = None
        if self.preloading:
            template = self._forking_template()
            if template is None:
                return None
        requests_limit = lifetime_limit = 0
        if cfg.max_requests > 0:
            requests_limit = cfg.max_requests + self.rng.randint(0, max(0, cfg.max_requests_jitter))
        if cfg.max_lifetime > 0:
            lifetime_limit = cfg.max_lifetime + self.rng.uniform(0, max(0.0, cfg.max_lifetime_jitter))
        worker = Worker(
            number=slot.number, generation=template.generation if template else self.generation,
            spawned_at=now, last_seen=now, requests_limit=requests_limit, lifetime_limit=lifetime_limit,
        )
        self.workers.append(worker)
        self.totals.spawned += 1
        self._act(Spawn(worker, self.boot_estimate(), template, self.rate_estimate()))
        return worker

    # ------------------------------------------------------------------ templates (--preload)

    def _forking_template(self, generation: int | None = None) -> Template | None:
        """The newest READY template (of ``generation``, if given)."""
        for template in reversed(self.templates):
            if template.state is TemplateState.READY and generation in (None, template.generation):
                return template
        return None

    def _fallback(self) -> Template | None:
        """A READY template older than the current generation (a reload's previous code)."""
        for template in reversed(self.templates):
            if template.state is TemplateState.READY and template.generation < self.generation:
                return template
        return None

    def _start_template(self, now: float) -> None:
        template = Template(self.generation, now)
        self.templates.append(template)
        self._act(StartTemplate(template))

    def _signal_template(self, template: Template, signum: int) -> None:
        if template.pid is not None:  # else ``template_started`` sends TERM once it has one
            self._act(Signal(template.pid, signum))

    def _template_transition(self, template: Template, event: str, now: float) -> None:
        new = TEMPLATE_TRANSITIONS.get((template.state, event))
        if new is None:
            return
        template.state = new
        if event == "ready":
            template.ready_at = now
            self.template_failures = 0
            self.ever_template_ready = True
            self.log.info("The %s loaded the application in %.0f ms; workers are forked from it.",
                          template.describe(), (now - template.spawned_at) * 1000)
        elif event == "stop":
            self._signal_template(template, signal.SIGTERM)

    def _retire_templates(self, below: int, now: float) -> None:
        """Stop the templates of generations older than ``below`` (a reload is complete)."""
        for template in self.templates:
            if template.generation < below:
                self._template_transition(template, "stop", now)

    def _abandon_reload(self, why: str, now: float) -> None:
        """A reload failed: the previous workers (and, with --preload, their template) stay."""
        self.log.error("Reload failed: %s; the previous workers keep serving.", why)
        for other in self.attached():
            if other.reason is Reason.RELOAD:
                other.reason, other.why = None, ""
        self.phase = Phase.RUNNING
        fallback = self._fallback()
        if fallback is not None:  # forget the new code: respawns come from the old template
            self.generation = fallback.generation
            for template in self.templates:
                if template.generation > fallback.generation:
                    self._template_transition(template, "stop", now)
        self._act(Notify(("READY=1", f"STATUS=Reload failed: {why}; previous workers still serving.")))

    def _update_phase(self, now: float) -> None:
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
                self._retire_templates(self.generation, now)
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
        for template in self.templates:
            self._template_transition(template, "stop", now)

    def _kill_all(self) -> None:
        for worker in self.workers:
            worker.killed = True
            self._signal(worker, signal.SIGKILL)
        for template in self.templates:
            self._signal_template(template, signal.SIGKILL)

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
            self._boots.append(worker.boot_time)
            self.ever_ready = True
            if slot is not None:
                slot.failures = 0
                if slot.successor is worker:
                    predecessor = slot.current
                    slot.current, slot.successor = worker, None
                    if predecessor is not None:
                        self._hand_over(predecessor, worker, now)
                elif slot.current is worker:
                    self.log.info("%s is ready in %.0f ms.", worker.describe().capitalize(), worker.boot_time * 1000)
        elif event == "handover":
            # "Leave at your limit": a worker that keeps its budget stops there itself; the
            # retire_at deadline is for one that does not (or a request budget traffic left).
            end = worker.lifetime_end
            if worker.reason is Reason.MAX_LIFETIME and end is not None:
                worker.retire_at = end
            else:
                worker.retire_at = now + max(HANDOVER_GRACE, HANDOVER_ETA_FACTOR * (worker.eta or 0.0))
            self._signal(worker, HANDOVER_SIGNAL)
        elif event == "holding":
            self.log.info("%s is at its budget (%d requests served) before its replacement was ready: it "
                          "accepts nothing new meanwhile.", worker.describe().capitalize(), worker.requests)
        elif event == "serve_on":
            worker.served_on = True
            self._signal(worker, SERVE_ON_SIGNAL)
            if old is State.HOLDING:
                self.log.warning("%s accepts again, past its budget: %s; it serves until a replacement is ready.",
                                 worker.describe().capitalize(), why)
        elif event == "retire":
            self._detach(worker, now)
            self._signal(worker, RETIRE_SIGNAL)  # the other workers go on serving
            worker.deadline = now + cfg.graceful_timeout + cfg.stop_margin
        elif event == "retiring":
            # The worker leaves on its own: its slot (if it still held one) is refilled at once.
            if old is State.FINISHING:
                self.log.info("%s is retiring at its budget (%d of %d requests served).",
                              worker.describe().capitalize(), worker.requests, worker.requests_limit)
            else:
                self.log.info("%s is retiring on its own.", worker.describe().capitalize())
            if self._detach(worker, now) and slot is not None:
                slot.next_spawn_at = now
            worker.deadline = now + cfg.graceful_timeout + cfg.stop_margin
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
                self._start_failed(worker, why, now)
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
        served_for = worker.last_seen - worker.ready_at if worker.ready_at is not None else 0.0
        if served_for > 0:  # an idle worker's 0 too: else a burst's rate outlives the burst
            self._rates.append(worker.requests / served_for)
        self.history.append(worker)
        self.totals.requests += worker.requests
        add_counters(self.totals.counters, worker.fields, self.config.counter_fields)
        if worker.reason is not None and worker.reason is not Reason.STOP:
            self.totals.restarts[worker.reason.value] += 1

    def _detach(self, worker: Worker, now: float, failure: bool = False) -> bool:
        """Take the worker out of its slot (it stays in ``workers`` until it exits); False if
        it held none."""
        slot = self.slots.get(worker.number)
        if slot is None:
            return False
        if slot.successor is worker:
            slot.successor = None
        elif slot.current is worker:
            slot.current, slot.successor = slot.successor, None
        else:
            return False
        if failure:
            slot.failures += 1
            slot.next_spawn_at = now + backoff(slot.failures)
        return True

    def _hand_over(self, predecessor: Worker, successor: Worker, now: float) -> None:
        """``successor`` is ready in ``predecessor``'s slot: a worker replaced for a budget
        finishes it, any other is retired now."""
        for older in self.workers:
            if older.state is State.FINISHING and older.number == predecessor.number:
                # One finishing worker per slot: replaced twice over, it has served enough.
                self.log.info("Retiring %s: a newer replacement is ready.", older.describe())
                self._transition(older, "retire", now)
        # A budget it has not reached yet: it finishes it. Past it, or holding at it: retire now.
        finish = (predecessor.reason in BUDGETS and predecessor.state is State.SERVING
                  and not _budget_spent(predecessor, now))
        self.log.info(
            "%s is ready in %.0f ms; %s %s: %s.", successor.describe().capitalize(), successor.boot_time * 1000,
            "handing over from" if finish else "retiring", predecessor.describe(), predecessor.why or "replaced",
        )
        self._transition(predecessor, "handover" if finish else "retire", now)

    def _never_ready(self, worker: Worker, why: str, how: str, now: float) -> None:
        self._start_failed(worker, why, now)
        self._detach(worker, now, failure=True)
        self._check_crash_loop(worker, how, now)

    def _start_failed(self, worker: Worker, why: str, now: float) -> None:
        """A worker never became ready. If it was meant to replace a reloaded worker, stop the reload."""
        slot = self.slots.get(worker.number)
        if slot is None or slot.successor is not worker or slot.current is None:
            return
        current = slot.current
        if current.reason is Reason.RELOAD and self.phase is Phase.RELOADING:
            self._abandon_reload(f"the new {worker.describe()} {why}", now)
        else:
            self.log.error(
                "The replacement for %s %s; %s keeps serving and will be replaced later.",
                current.describe(), why, current.describe(),
            )
        if current.state is State.HOLDING or (current.reason in BUDGETS and not current.served_on):
            self._transition(current, "serve_on", now, f"its replacement {why}")  # at its budget, or soon

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
