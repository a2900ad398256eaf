"""The master loop: forks workers, keeps their number, replaces them, reloads and stops them.

Rules this module keeps
-----------------------
1. One thread. The master never starts a thread, so ``fork()`` is always safe: no lock can be
   held by a thread that does not exist in the child.
2. Signal handlers only record the signal number; the loop acts on it. ``signal.set_wakeup_fd``
   wakes the selector, so a signal is handled within one loop iteration.
3. Capacity first. A worker that has to go for a planned reason (reload, max requests, max
   lifetime, max memory) is retired only after its replacement has reported ``ready``. Only a
   crash or a hang loses capacity, and only until the respawn. (One exception: a worker above
   twice its --max-memory is retired at once; its connections wait in the kernel backlog.)
4. Never many at once: at most ``rotate_at_once`` replacements are in flight.
5. Every timer is a deadline on the monotonic clock; the loop sleeps until the nearest one.
6. The listening sockets stay open in the master for its whole life, and the master never
   imports the application: workers do, after fork, so a reload picks up new code.
7. A broken deploy never takes the service down: a replacement that fails to start aborts the
   reload and the old workers keep serving.

Theory of operation
-------------------
Capacity is a set of numbered *slots* (``--workers N`` → slots 1..N; TTIN/TTOU add and remove
one). A slot holds its ``current`` worker and, while it is being replaced, a ``successor``.
Workers that left their slot (retiring or aborting) wait in the loop until they exit.

Each loop iteration: wait on the selector (worker channels, the signal wakeup pipe, the file
watcher) until the nearest deadline; read channel messages; reap exited children; act on
signals; then ``_tick``: check deadlines, decide recycling, fill empty slots and start
successors (``_reconcile``), and tell systemd what changed.

Worker states, every change made by ``_transition`` from this table::

    STARTING --ready-------> SERVING          (successor ready: its predecessor gets "retire")
    STARTING/SERVING --retire--> RETIRING     (we sent the stop signal; deadline = graceful bound)
    STARTING/SERVING --retiring--> RETIRING   (the worker said it is leaving on its own)
    STARTING/SERVING/RETIRING --hung--> ABORTING  (SIGABRT; deadline = abort grace, then SIGKILL)
    any --exit (reaped)--> gone               (``_on_exit``: crash accounting, backoff, respawn)

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
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field

from supervisor import child, memory, privileges, systemd
from supervisor.channel import HEARTBEAT, READY, RETIRING, decode
from supervisor.child import MASTER_SIGNALS, WorkerContext, WorkerTarget
from supervisor.config import EXIT_ERROR, EXIT_OK, EXIT_STARTUP_FAILED, SupervisorConfig, SupervisorError
from supervisor.pidfile import PidFile
from supervisor.proctitle import master_title, set_title, worker_title
from supervisor.watch import make_watcher

MAX_BACKOFF = 10.0
# --max-memory: above this multiple of the limit a worker is retired without waiting for its
# replacement (rule 3's one exception: a runaway leak must not take the machine down).
HARD_MEMORY_FACTOR = 2.0


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


S = State
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.STARTING, "ready"): S.SERVING,
    (S.STARTING, "retire"): S.RETIRING,
    (S.SERVING, "retire"): S.RETIRING,
    (S.STARTING, "retiring"): S.RETIRING,
    (S.SERVING, "retiring"): S.RETIRING,
    (S.STARTING, "hung"): S.ABORTING,
    (S.SERVING, "hung"): S.ABORTING,
    (S.RETIRING, "hung"): S.ABORTING,
}


@dataclass(eq=False)
class Worker:
    number: int
    pid: int
    fd: int
    generation: int
    spawned_at: float
    state: State = State.STARTING
    ready_at: float | None = None
    last_seen: float = 0.0
    requests: int = 0
    deadline: float | None = None  # RETIRING / ABORTING: SIGKILL after this
    killed: bool = False
    replace_reason: str | None = None
    requests_limit: int = 0
    lifetime_limit: float = 0.0
    memory_over: int = 0
    buffer: bytes = b""

    def describe(self) -> str:
        return f"worker {self.number} (pid {self.pid})"


@dataclass(eq=False)
class Slot:
    number: int
    current: Worker | None = None
    successor: Worker | None = None
    failures: int = 0  # consecutive starts that never became ready, or crashes
    next_spawn_at: float = 0.0


@dataclass
class Stats:
    requests_of_exited: int = 0
    last_status: str = ""
    next_status_at: float = 0.0
    next_memory_at: float = 0.0
    next_watchdog_at: float = 0.0
    next_poll_at: float = 0.0
    spawned: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def backoff(failures: int) -> float:
    """Delay before respawning after ``failures`` failures in a row: the first respawn is
    immediate (a one-off crash should cost no capacity), then 0.1 s doubling up to 10 s."""
    return 0.0 if failures <= 1 else min(MAX_BACKOFF, 0.1 * 2 ** (failures - 2))


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    return f"exited with code {code}"


class Master:
    def __init__(
        self,
        target: WorkerTarget,
        sockets: list[socket.socket],
        config: SupervisorConfig | None = None,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.target = target
        self.sockets = sockets
        self.config = config or SupervisorConfig()
        self.log = logger or logging.getLogger("supervisor")
        self.pid = os.getpid()
        self.phase = Phase.STARTING
        self.generation = 1
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, Worker] = {}  # pid -> worker, every live child we forked
        self.exit_code = EXIT_OK
        self.ever_ready = False
        self.stop_deadline: float | None = None
        self.stats = Stats()
        self._signals: list[int] = []
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._notifier = systemd.Notifier(None)
        self._watchdog: float | None = None
        self._watcher = None
        self._pidfile: PidFile | None = None
        self._identity = privileges.Identity(None, None, None)
        self._old_handlers: dict[int, object] = {}
        self._rotate_at_once = 1

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Run until stopped; return the process exit code (0, 1 for setup errors, 3 crash loop)."""
        try:
            self._setup()
        except SupervisorError as exc:
            self.log.error("%s", exc)
            self._teardown()
            return EXIT_ERROR
        try:
            self._tick(time.monotonic())
            while self.workers or self.phase not in (Phase.STOPPING, Phase.HALTING):
                self._wait(self._next_timeout())
                self._reap()
                self._handle_signals()
                self._tick(time.monotonic())
        finally:
            self._teardown()
        return self.exit_code

    def _setup(self) -> None:
        cfg = self.config
        workers = cfg.resolved_workers()
        self._rotate_at_once = cfg.resolved_rotate_at_once(workers)
        if cfg.umask is not None:
            os.umask(cfg.umask)
        self._identity = privileges.resolve(cfg.user, cfg.group)
        if cfg.pidfile:
            self._pidfile = PidFile(cfg.pidfile)
            self._pidfile.create(self.pid)
        set_title(master_title(cfg.proc_name, cfg.label))
        self._notifier = systemd.Notifier.from_environ()
        self._watchdog = systemd.watchdog_interval()
        self._selector = selectors.DefaultSelector()
        self._wakeup = socket.socketpair()
        for end in self._wakeup:
            end.setblocking(False)
        self._selector.register(self._wakeup[0], selectors.EVENT_READ, "wakeup")
        signal.set_wakeup_fd(self._wakeup[1].fileno(), warn_on_full_buffer=False)
        for signum in MASTER_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._record_signal)
        if cfg.reload:
            self._watcher = make_watcher(cfg.reload_dirs, cfg.reload_include, cfg.reload_exclude, cfg.reload_watcher)
            if self._watcher.fileno() is not None:
                self._selector.register(self._watcher.fileno(), selectors.EVENT_READ, "watcher")
        for number in range(1, workers + 1):
            self.slots[number] = Slot(number)
        self.log.info(
            "Master started (pid %d): %d worker%s on %s", self.pid, workers, "" if workers == 1 else "s",
            ", ".join(_describe_socket(s) for s in self.sockets) or "no sockets",
        )

    def _teardown(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for end in self._wakeup:
                end.close()
            self._wakeup = None
        for worker in self.workers.values():
            _close_fd(worker)
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._pidfile is not None:
            self._pidfile.remove()
        self._notifier.close()

    # ------------------------------------------------------------------ waiting and input

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        deadlines = [now + 1.0]
        cfg = self.config
        for worker in self.workers.values():
            if worker.state is State.STARTING:
                deadlines.append(worker.spawned_at + cfg.startup_timeout)
            elif worker.state is State.SERVING:
                deadlines.append(worker.last_seen + cfg.timeout_worker)
                if worker.lifetime_limit and worker.ready_at is not None:
                    deadlines.append(worker.ready_at + worker.lifetime_limit)
            elif worker.deadline is not None and not worker.killed:
                deadlines.append(worker.deadline)
        if self.phase not in (Phase.STOPPING, Phase.HALTING):
            deadlines.extend(s.next_spawn_at for s in self.slots.values() if s.current is None)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        if self._watchdog:
            deadlines.append(self.stats.next_watchdog_at)
        if self.config.max_memory:
            deadlines.append(self.stats.next_memory_at)
        return max(0.0, min(deadlines) - now)

    def _wait(self, timeout: float) -> None:
        assert self._selector is not None
        for key, _ in self._selector.select(timeout):
            if key.data == "wakeup":
                try:
                    while self._wakeup and self._wakeup[0].recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            elif key.data == "watcher":
                self._check_watcher()
            else:
                self._read_channel(key.data)

    def _read_channel(self, worker: Worker) -> None:
        try:
            data = os.read(worker.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the worker closed its end (normally: it exited; _reap does the rest)
            _unregister(self._selector, worker)
            return
        messages, worker.buffer = decode(worker.buffer + data)
        now = time.monotonic()
        worker.last_seen = now
        for message in messages:
            if message.kind == HEARTBEAT:
                worker.requests = max(worker.requests, message.requests or 0)
            elif message.kind == READY:
                self._transition(worker, "ready")
            elif message.kind == RETIRING:
                self._transition(worker, "retiring")

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self._on_exit(worker, status)
            elif self._watcher is not None and pid == getattr(self._watcher, "pid", None):
                self._selector_unregister_fd(self._watcher.fileno())
                self._watcher.close()
                self._watcher = None
                if self.phase in (Phase.STOPPING, Phase.HALTING):
                    continue  # it shares our fate (a signal to the process group): nothing to replace
                self.log.warning("The file watcher process %s; falling back to polling.", describe_status(status))
                from supervisor.watch import PathFilter, PollingWatcher

                cfg = self.config
                self._watcher = PollingWatcher(
                    cfg.reload_dirs or [os.getcwd()], PathFilter(cfg.reload_include, cfg.reload_exclude)
                )

    def _selector_unregister_fd(self, fd: int | None) -> None:
        if fd is not None and self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # _reap runs every iteration
            if signum == signal.SIGTERM:
                self._begin_stop(signal.SIGTERM, "SIGTERM")
            elif signum in (signal.SIGINT, signal.SIGQUIT):
                if self.phase is Phase.HALTING and signum == signal.SIGINT:
                    self.log.warning("Second SIGINT: killing the workers now.")
                    self._kill_all()
                else:
                    self._begin_stop(signum, signal.Signals(signum).name)
            elif self.phase in (Phase.STOPPING, Phase.HALTING):
                continue  # no reloads or resizing while stopping
            elif signum == signal.SIGHUP:
                self._begin_reload("SIGHUP")
            elif signum == signal.SIGTTIN:
                self._resize(+1)
            elif signum == signal.SIGTTOU:
                self._resize(-1)
            elif signum == signal.SIGUSR1:
                self._reopen_logs()

    def _check_watcher(self) -> None:
        if self._watcher is None or self.phase in (Phase.STOPPING, Phase.HALTING):
            return
        changed = self._watcher.poll()
        if changed:
            shown = ", ".join(os.path.relpath(p) for p in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            self.log.warning("Detected changes in %s%s; restarting the workers.", shown, more)
            self._begin_reload("file change")

    # ------------------------------------------------------------------ the one place for state changes

    def _transition(self, worker: Worker, event: str, why: str = "") -> None:
        new = TRANSITIONS.get((worker.state, event))
        if new is None:
            return  # e.g. "ready" from a worker we already retire: nothing changes
        now = time.monotonic()
        old, worker.state = worker.state, new
        slot = self.slots.get(worker.number)
        if new is State.SERVING:
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
                            predecessor.describe(), predecessor.replace_reason or "replaced",
                        )
                        self._transition(predecessor, "retire")
                else:
                    self.log.info("%s is ready.", worker.describe().capitalize())
        elif new is State.RETIRING:
            self._detach(worker)
            if event == "retire":
                stop = signal.SIGTERM
                _signal(worker, stop)
                worker.deadline = now + self.config.graceful_timeout + self.config.stop_margin
            else:
                # The worker leaves on its own: its slot is refilled at once, no backoff.
                self.log.info("%s is retiring on its own.", worker.describe().capitalize())
                worker.deadline = now + self.config.graceful_timeout + self.config.stop_margin
                if slot is not None:
                    slot.next_spawn_at = now
        elif new is State.ABORTING:
            self.log.error("%s %s; sending SIGABRT, then SIGKILL.", worker.describe().capitalize(), why)
            if old is State.STARTING:
                self._start_failed(worker, why)
            self._detach(worker, failure=True)
            _signal(worker, signal.SIGABRT)
            worker.deadline = now + self.config.abort_grace
            if old is State.STARTING:
                self._check_crash_loop(worker, why)

    def _detach(self, worker: Worker, failure: bool = False) -> None:
        """Take the worker out of its slot (it stays in self.workers until it exits)."""
        slot = self.slots.get(worker.number)
        if slot is None:
            return
        now = time.monotonic()
        if slot.successor is worker:
            slot.successor = None
        elif slot.current is worker:
            slot.current, slot.successor = slot.successor, None
        else:
            return
        if failure:
            slot.failures += 1
            slot.next_spawn_at = now + backoff(slot.failures)

    def _on_exit(self, worker: Worker, status: int) -> None:
        self._drain(worker)
        _close_fd(worker, self._selector)
        self.stats.requests_of_exited += worker.requests
        how = describe_status(status)
        if worker.state is State.RETIRING:
            self.log.info("%s %s after retiring (%d request(s) served).", worker.describe().capitalize(), how, worker.requests)
            return
        if worker.state is State.ABORTING:
            self.log.warning("%s %s after it was found hung.", worker.describe().capitalize(), how)
            return
        if self.phase in (Phase.STOPPING, Phase.HALTING):
            self.log.info("%s %s.", worker.describe().capitalize(), how)
            return
        if worker.state is State.STARTING:
            self.log.error("%s %s before it was ready.", worker.describe().capitalize(), how)
            self._start_failed(worker, f"{how} before it was ready")
        else:
            self.log.error("%s %s unexpectedly; starting a new one.", worker.describe().capitalize(), how)
        self._detach(worker, failure=True)
        self._check_crash_loop(worker, how)

    def _start_failed(self, worker: Worker, why: str) -> None:
        """A worker never became ready. If it was meant to replace a reloaded worker, stop the reload."""
        slot = self.slots.get(worker.number)
        if slot is None or slot.successor is not worker or slot.current is None:
            return
        if slot.current.replace_reason == "reload" and self.phase is Phase.RELOADING:
            self.log.error(
                "Reload failed: the new %s %s; the previous workers keep serving.", worker.describe(), why
            )
            for other in self._attached():
                if other.replace_reason == "reload":
                    other.replace_reason = None
            self.phase = Phase.RUNNING
            self._notifier.notify("READY=1", f"STATUS=Reload failed: new worker {why}; previous workers still serving.")
        else:
            self.log.error(
                "The replacement for %s %s; %s keeps serving and will be replaced later.",
                slot.current.describe(), why, slot.current.describe(),
            )

    def _check_crash_loop(self, worker: Worker, how: str) -> None:
        slot = self.slots.get(worker.number)
        if self.ever_ready or slot is None or slot.failures < self.config.startup_attempts:
            return
        self.log.error(
            "Workers keep failing before they are ready (worker %d %s, %d attempts in a row); "
            "stopping. See the worker's error above.", worker.number, how, slot.failures,
        )
        self.exit_code = EXIT_STARTUP_FAILED
        self._begin_stop(signal.SIGTERM, None, bound=min(self.config.graceful_timeout, 5.0))

    def _drain(self, worker: Worker) -> None:
        """Read what a dead worker left in its pipe (its last request count)."""
        if worker.fd < 0:
            return
        try:
            while data := os.read(worker.fd, 65536):
                messages, worker.buffer = decode(worker.buffer + data)
                for message in messages:
                    if message.kind == HEARTBEAT:
                        worker.requests = max(worker.requests, message.requests or 0)
        except OSError:
            pass

    # ------------------------------------------------------------------ timers, recycling, capacity

    def _tick(self, now: float) -> None:
        cfg = self.config
        for worker in list(self.workers.values()):
            if worker.state is State.STARTING and now - worker.spawned_at > cfg.startup_timeout:
                self._transition(worker, "hung", f"did not become ready within {cfg.startup_timeout:g} s")
            elif worker.state is State.SERVING and now - worker.last_seen > cfg.timeout_worker:
                self._transition(worker, "hung", f"sent no heartbeat for {cfg.timeout_worker:g} s")
            elif worker.deadline is not None and now >= worker.deadline and not worker.killed:
                if worker.state is State.RETIRING:
                    self.log.warning("%s did not finish retiring in time; killing it.", worker.describe().capitalize())
                worker.killed = True
                _signal(worker, signal.SIGKILL)
        if self._watchdog and now >= self.stats.next_watchdog_at:
            self._notifier.notify("WATCHDOG=1")  # the loop is turning: that is what systemd asks
            self.stats.next_watchdog_at = now + self._watchdog
        if self.phase in (Phase.STOPPING, Phase.HALTING):
            if self.stop_deadline is not None and now >= self.stop_deadline and self.workers:
                self.log.warning("%d worker(s) did not stop in time; killing them.", len(self.workers))
                self._kill_all()
                self.stop_deadline = None
            return
        self._check_recycling(now)
        self._reconcile(now)
        self._update_phase()
        self._notify_periodic(now)
        if self._watcher is not None and self._watcher.fileno() is None and now >= self.stats.next_poll_at:
            self.stats.next_poll_at = now + cfg.reload_interval
            self._check_watcher()

    def _check_recycling(self, now: float) -> None:
        cfg = self.config
        sample = bool(cfg.max_memory) and now >= self.stats.next_memory_at
        if sample:
            self.stats.next_memory_at = now + cfg.memory_interval
        limit = cfg.max_memory * 1024 * 1024
        for worker in self._attached():
            if worker.state is not State.SERVING:
                continue
            used = memory.unique_memory(worker.pid) if sample else None
            if used is not None and used > HARD_MEMORY_FACTOR * limit:
                # A fast leak outruns "replacement first": stop feeding it now. New connections
                # wait in the kernel backlog for the other workers or the replacement.
                self.log.warning(
                    "Retiring %s at once: it uses %.0f MiB, over %g times its limit of %g MiB.",
                    worker.describe(), used / 1048576, HARD_MEMORY_FACTOR, cfg.max_memory,
                )
                worker.replace_reason = worker.replace_reason or "memory"
                self._transition(worker, "retire")
                continue
            if worker.replace_reason:
                continue
            reason = None
            if worker.requests_limit and worker.requests >= worker.requests_limit:
                reason = f"served {worker.requests} requests, limit {worker.requests_limit}"
            elif worker.lifetime_limit and worker.ready_at is not None and now - worker.ready_at >= worker.lifetime_limit:
                reason = f"lived {now - worker.ready_at:.0f} s, limit {worker.lifetime_limit:.0f} s"
            elif sample:
                worker.memory_over = worker.memory_over + 1 if used is not None and used > limit else 0
                if worker.memory_over >= cfg.memory_samples and used is not None:
                    reason = f"uses {used / 1048576:.0f} MiB, limit {cfg.max_memory:g} MiB"
            if reason:
                worker.replace_reason = reason
                self.log.info("Recycling %s: %s; starting its replacement first.", worker.describe(), reason)

    def _reconcile(self, now: float) -> None:
        in_flight = sum(1 for s in self.slots.values() if s.successor is not None)
        for slot in self.slots.values():
            if slot.current is None and now >= slot.next_spawn_at:
                slot.current = self._spawn(slot)
        for slot in self.slots.values():
            if in_flight >= self._rotate_at_once:
                break
            current = slot.current
            if (
                current is not None and current.state is State.SERVING and current.replace_reason
                and slot.successor is None and now >= slot.next_spawn_at
            ):
                slot.successor = self._spawn(slot)
                in_flight += slot.successor is not None

    def _update_phase(self) -> None:
        if self.phase is Phase.STARTING:
            if all(s.current is not None and s.current.state is State.SERVING for s in self.slots.values()):
                self.phase = Phase.RELOADING if any(w.replace_reason == "reload" for w in self._attached()) else Phase.RUNNING
                self.log.info("Ready: %d worker(s) serving.", len(self.slots))
                self._notifier.notify("READY=1", f"MAINPID={self.pid}", f"STATUS={self._status_text()}")
        elif self.phase is Phase.RELOADING:
            done = all(
                s.successor is None and s.current is not None and s.current.state is State.SERVING
                and s.current.generation == self.generation
                for s in self.slots.values()
            )
            if done:
                self.phase = Phase.RUNNING
                self.log.info("Reload complete: %d worker(s) serving the new code.", len(self.slots))
                self._notifier.notify("READY=1", f"STATUS={self._status_text()}")

    def _notify_periodic(self, now: float) -> None:
        if self._notifier.enabled and self.phase is not Phase.STARTING and now >= self.stats.next_status_at:
            text = self._status_text()
            if text != self.stats.last_status:
                self._notifier.notify(f"STATUS={text}")
                self.stats.last_status = text
                self.stats.next_status_at = now + self.config.status_interval

    def _status_text(self) -> str:
        serving = sum(1 for w in self._attached() if w.state is State.SERVING)
        total = self.stats.requests_of_exited + sum(w.requests for w in self.workers.values())
        text = f"{serving} of {len(self.slots)} workers serving, {total} requests served"
        if self.phase is Phase.RELOADING:
            text += ", reloading"
        return text

    # ------------------------------------------------------------------ commands (signals)

    def _begin_reload(self, why: str) -> None:
        self.generation += 1
        flagged = 0
        for worker in self._attached():
            if worker.generation < self.generation:
                worker.replace_reason = "reload"
                flagged += 1
        self.log.info("Reloading (%s): replacing %d worker(s), %d at a time.", why, flagged, self._rotate_at_once)
        if self.phase is Phase.RUNNING or self.phase is Phase.RELOADING:
            self.phase = Phase.RELOADING
            self._notifier.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}", "STATUS=Reloading")

    def _resize(self, delta: int) -> None:
        if delta > 0:
            number = 1
            while number in self.slots:
                number += 1
            self.slots[number] = Slot(number)
            self.log.info("SIGTTIN: adding worker %d (%d workers).", number, len(self.slots))
            return
        if len(self.slots) <= 1:
            self.log.warning("SIGTTOU ignored: at least one worker must remain.")
            return
        number = max(self.slots)
        slot = self.slots[number]
        self.log.info("SIGTTOU: removing worker %d (%d workers).", number, len(self.slots) - 1)
        for worker in (slot.successor, slot.current):
            if worker is not None:
                self._transition(worker, "retire")
        del self.slots[number]

    def _reopen_logs(self) -> None:
        try:
            self.config.reopen_logs()
        except Exception as exc:
            self.log.error("Could not reopen the log files: %s", exc)
        for worker in self.workers.values():
            _signal(worker, signal.SIGUSR1)
        self.log.info("Reopened log files (SIGUSR1 forwarded to %d worker(s)).", len(self.workers))

    def _begin_stop(self, signum: int, name: str | None, bound: float | None = None) -> None:
        halting = signum != signal.SIGTERM
        if self.phase is Phase.HALTING or (self.phase is Phase.STOPPING and not halting):
            return
        if name:
            self.log.info("%s: %s.", name, "quick stop" if halting else "graceful stop")
        self.phase = Phase.HALTING if halting else Phase.STOPPING
        self._notifier.notify("STOPPING=1", "STATUS=Stopping")
        bound = self.config.graceful_timeout if bound is None else bound
        self.stop_deadline = time.monotonic() + bound + self.config.stop_margin
        for worker in self.workers.values():
            if halting:
                _signal(worker, signal.SIGQUIT)  # the workers' "quick stop"
            elif worker.state in (State.STARTING, State.SERVING):
                _signal(worker, signal.SIGTERM)
            if worker.state in (State.STARTING, State.SERVING):
                worker.state = State.RETIRING

    def _kill_all(self) -> None:
        for worker in self.workers.values():
            worker.killed = True
            _signal(worker, signal.SIGKILL)

    # ------------------------------------------------------------------ forking

    def _attached(self) -> list[Worker]:
        return [w for s in self.slots.values() for w in (s.current, s.successor) if w is not None]

    def _spawn(self, slot: Slot) -> Worker | None:
        cfg = self.config
        requests_limit = lifetime_limit = 0
        if cfg.max_requests > 0:
            requests_limit = cfg.max_requests + random.randint(0, max(0, cfg.max_requests_jitter))
        if cfg.max_lifetime > 0:
            lifetime_limit = cfg.max_lifetime + random.uniform(0, max(0.0, cfg.max_lifetime_jitter))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(read_fd)
            os.close(write_fd)
            self.log.error("Cannot fork a worker: %s.", exc.strerror)
            slot.failures += 1
            slot.next_spawn_at = time.monotonic() + backoff(slot.failures)
            return None
        if pid == 0:
            self._become_worker(slot, read_fd, write_fd, requests_limit)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        now = time.monotonic()
        worker = Worker(
            number=slot.number, pid=pid, fd=read_fd, generation=self.generation, spawned_at=now,
            last_seen=now, requests_limit=requests_limit, lifetime_limit=lifetime_limit,
        )
        self.workers[pid] = worker
        assert self._selector is not None
        self._selector.register(read_fd, selectors.EVENT_READ, worker)
        self.stats.spawned += 1
        self.log.debug("Started %s (generation %d).", worker.describe(), worker.generation)
        return worker

    def _become_worker(self, slot: Slot, read_fd: int, write_fd: int, requests_limit: int) -> None:
        """In the child: never returns."""
        code = 1
        try:
            inherited = [read_fd] + [w.fd for w in self.workers.values() if w.fd >= 0]
            if self._wakeup is not None:
                inherited += [end.fileno() for end in self._wakeup]
            if self._selector is not None and hasattr(self._selector, "fileno"):
                inherited.append(self._selector.fileno())  # type: ignore[attr-defined]
            if self._notifier.enabled:
                inherited.append(self._notifier.fileno())
            if self._watcher is not None and self._watcher.fileno() is not None:
                inherited.append(self._watcher.fileno())  # type: ignore[arg-type]
            child.reset_process(inherited)
            set_title(worker_title(self.config.proc_name, slot.number, self.config.label))
            privileges.drop(self._identity)
            context = WorkerContext(
                number=slot.number,
                generation=self.generation,
                sockets=self.sockets,
                channel=child.Channel(write_fd, self.pid),
                master_pid=self.pid,
                requests_limit=requests_limit,
            )
            code = child.run_target(self.target, context, self.log)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            child.exit_child(code)


def _describe_socket(sock: socket.socket) -> str:
    from supervisor.sockets import describe

    try:
        return describe(sock)
    except OSError:
        return f"fd {sock.fileno()}"


def _signal(worker: Worker, signum: int) -> None:
    try:
        os.kill(worker.pid, signum)
    except ProcessLookupError:
        pass


def _unregister(selector: selectors.BaseSelector | None, worker: Worker) -> None:
    if selector is not None and worker.fd >= 0:
        try:
            selector.unregister(worker.fd)
        except (KeyError, ValueError):
            pass


def _close_fd(worker: Worker, selector: selectors.BaseSelector | None = None) -> None:
    if worker.fd >= 0:
        _unregister(selector, worker)
        os.close(worker.fd)
        worker.fd = -1


def run(
    target: WorkerTarget,
    sockets: list[socket.socket],
    config: SupervisorConfig | None = None,
    *,
    logger: logging.Logger | None = None,
) -> int:
    """Supervise workers running ``target`` on ``sockets`` until stopped; return the exit code."""
    return Master(target, sockets, config, logger=logger).run()
