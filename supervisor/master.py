"""The master loop: the I/O half of the supervisor (the decisions are ``supervisor.policy``'s).

Rules this module keeps
-----------------------
1. One thread. The master never starts a thread, so ``fork()`` is always safe: no lock can be
   held by a thread that does not exist in the child.
2. Signal handlers only record the signal number; the loop acts on it. ``signal.set_wakeup_fd``
   wakes the selector, so a signal is handled within one loop iteration.
3. The loop decides nothing. It turns what happens (channel bytes, exits, signals, time) into
   the policy's events and applies the policy's actions (fork, kill, sd_notify, memory
   samples); which worker to start, retire or signal, and when, is the policy's call.
4. The listening sockets stay open in the master for its whole life, and the master never
   imports the application: workers do, after fork, so a reload picks up new code; with
   ``preload``, a template process does, once, and the workers are forked from it
   (``supervisor.forkserver``: the master asks over a socket, and stays their parent).

Theory of operation
-------------------
Each iteration: apply the policy's queued actions; wait on the selector (worker channels, the
signal wakeup pipe, the file watcher) until the policy's next deadline; feed channel messages
to the policy, and templates' replies (``ready``, ``spawned``: the worker's pid); reap exited
children (a worker's channel is drained first, so its last request count is not lost); hand
recorded signals to the policy; then ``tick`` it. Besides, the loop
keeps two timers of its own that are about the loop itself: systemd's watchdog ping (the loop
is turning) and the polling file watcher.
"""

from __future__ import annotations

import itertools
import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import NoReturn

from supervisor import child, forkserver, memory, privileges, systemd
from supervisor.channel import decode
from supervisor.child import MASTER_SIGNALS, WorkerSpec, WorkerTarget
from supervisor.config import EXIT_ERROR, SupervisorConfig, SupervisorError
from supervisor.forkserver import SpawnRequest, TemplateHandle
from supervisor.pidfile import PidFile
from supervisor.policy import (
    Measure,
    Notify,
    Policy,
    ReopenLogs,
    Signal,
    Spawn,
    StartTemplate,
    Template,
    Worker,
    describe_status,
)
from supervisor.proctitle import master_title, set_title, template_title, worker_title

EARLY_EXITS_KEPT = 64  # exits reaped before the template said whose pid it was
from supervisor.watch import make_watcher


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
        self.policy: Policy | None = None
        self._fds: dict[Worker, int] = {}  # each live worker's channel (read end)
        self._buffers: dict[Worker, bytes] = {}
        self._signals: list[int] = []
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._notifier = systemd.Notifier(None)
        self._watchdog: float | None = None
        self._next_watchdog_at = 0.0
        self._next_poll_at = 0.0
        self._watcher = None
        self._pidfile: PidFile | None = None
        self._identity = privileges.Identity(None, None, None)
        self._old_handlers: dict[int, object] = {}
        self._templates: dict[Template, TemplateHandle] = {}
        self._spawning: dict[int, tuple[Worker, Template]] = {}  # request id -> worker, while forked
        self._request_ids = itertools.count(1)
        self._early_exits: dict[int, int] = {}  # pid -> wait status, for workers not yet "spawned"
        self._watched: dict[int, Callable[[int], None]] = {}  # services' descriptors -> callbacks

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Run until stopped; return the process exit code (0, 1 for setup errors, 3 crash loop)."""
        try:
            policy = self._setup()
        except SupervisorError as exc:
            self.log.error("%s", exc)
            self._teardown()
            return EXIT_ERROR
        try:
            for service in self.config.services:
                service.start(self)
            policy.start(time.monotonic())
            self._apply()
            while not policy.finished:
                self._wait(self._next_timeout(policy))
                self._reap()
                self._handle_signals()
                self._tick(policy)
                self._apply()
        finally:
            self._teardown()
        return policy.exit_code

    def _setup(self) -> Policy:
        cfg = self.config
        workers = cfg.resolved_workers()
        self.policy = policy = Policy(cfg, workers=workers, mainpid=self.pid, logger=self.log)
        if cfg.umask is not None:
            os.umask(cfg.umask)
        if cfg.preload is not None:
            forkserver.become_subreaper()
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
            self._watcher = make_watcher(
                cfg.reload_dirs, cfg.reload_include, cfg.reload_exclude, cfg.reload_watcher, cfg.reload_interval
            )
            if self._watcher.fileno() is not None:
                self._selector.register(self._watcher.fileno(), selectors.EVENT_READ, "watcher")
        self.log.info(
            "Master started (pid %d): %d worker%s on %s", self.pid, workers, "" if workers == 1 else "s",
            ", ".join(_describe_socket(s) for s in self.sockets) or "no sockets",
        )
        return policy

    def _teardown(self) -> None:
        for service in self.config.services:
            try:
                service.close()
            except Exception as exc:
                self.log.error("Could not close %r: %s", service, exc)
        self._watched.clear()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for end in self._wakeup:
                end.close()
            self._wakeup = None
        for worker in list(self._fds):
            self._close_channel(worker)
        for handle in self._templates.values():
            handle.close()
        self._templates.clear()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._pidfile is not None:
            self._pidfile.remove()
        self._notifier.close()

    # ------------------------------------------------------------------ for services

    def watch(self, fileobj: socket.socket | int, events: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` in the loop when ``fileobj`` is ready for ``events``
        (``selectors.EVENT_READ``/``EVENT_WRITE``); watched again, the new events replace the
        old. Children close it after fork. Callbacks must not block."""
        assert self._selector is not None
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._watched:
            self._selector.modify(fd, events, "service")
        else:
            self._selector.register(fd, events, "service")
        self._watched[fd] = callback

    def unwatch(self, fileobj: socket.socket | int) -> None:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self._watched.pop(fd, None) is not None and self._selector is not None:
            self._selector.unregister(fd)

    # ------------------------------------------------------------------ applying the policy's actions

    def _apply(self) -> None:
        assert self.policy is not None
        while actions := self.policy.take():
            for action in actions:
                if isinstance(action, Spawn):
                    if action.template is not None:
                        self._spawn_from(action.template, action)
                    else:
                        self._fork(action)
                elif isinstance(action, StartTemplate):
                    self._fork_template(action.template)
                elif isinstance(action, Signal):
                    try:
                        os.kill(action.pid, action.signum)
                    except ProcessLookupError:
                        pass
                elif isinstance(action, Notify):
                    self._notifier.notify(*action.fields)
                elif isinstance(action, Measure):
                    samples = {w: memory.unique_memory(w.pid) if w.pid else None for w in action.workers}
                    self.policy.memory(samples, time.monotonic())
                elif isinstance(action, ReopenLogs):
                    try:
                        self.config.reopen_logs()
                    except Exception as exc:
                        self.log.error("Could not reopen the log files: %s", exc)
                    else:
                        self.log.info("Reopened log files (SIGUSR1 forwarded to %d worker(s)).", action.forwarded)

    # ------------------------------------------------------------------ waiting and input

    def _record_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _next_timeout(self, policy: Policy) -> float:
        now = time.monotonic()
        deadline = policy.next_deadline(now)
        if self._watchdog:
            deadline = min(deadline, self._next_watchdog_at)
        if self._watcher is not None and self._watcher.fileno() is None:
            deadline = min(deadline, self._next_poll_at)
        return max(0.0, deadline - now)

    def _wait(self, timeout: float) -> None:
        assert self._selector is not None
        for key, events in self._selector.select(timeout):
            if key.data == "service":
                callback = self._watched.get(key.fd)
                if callback is not None:
                    callback(events)
            elif key.data == "wakeup":
                try:
                    while self._wakeup and self._wakeup[0].recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            elif key.data == "watcher":
                self._check_watcher()
            elif isinstance(key.data, Template):
                self._read_template(key.data)
            else:
                self._read_channel(key.data)

    def _read_channel(self, worker: Worker, drain: bool = False) -> None:
        """Feed what the worker wrote to the policy; ``drain``: everything, it has exited."""
        assert self.policy is not None
        if worker.pid is None:  # forked by a template: its "spawned" (the pid) comes first
            for template in list(self._templates):
                self._read_template(template)
        fd = self._fds.get(worker)
        while fd is not None:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # the worker closed its end (normally: it exited; _reap does the rest)
                self._unregister(worker)
                return
            messages, self._buffers[worker] = decode(self._buffers.get(worker, b"") + data)
            now = time.monotonic()
            for message in messages:
                self.policy.message(worker, message, now)
            if not drain:
                return

    def _reap(self) -> None:
        assert self.policy is not None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.policy.worker(pid)
            template = self.policy.template(pid)
            if worker is None and template is None and self._templates:
                for known in list(self._templates):  # perhaps its "spawned" is still unread
                    self._read_template(known)
                worker = self.policy.worker(pid)
            if worker is not None:
                self._worker_exited(worker, status)
            elif template is not None:
                self._template_exited(template, status)
            elif self._templates and not (self._watcher is not None and pid == getattr(self._watcher, "pid", None)):
                # A worker whose template has not said its pid yet, or an orphan of the app's
                # re-parented to us (we are a subreaper): kept until a "spawned" claims it.
                self._early_exits[pid] = status
                while len(self._early_exits) > EARLY_EXITS_KEPT:
                    del self._early_exits[next(iter(self._early_exits))]
            elif self._watcher is not None and pid == getattr(self._watcher, "pid", None):
                self._watcher_exited(status)

    def _worker_exited(self, worker: Worker, status: int) -> None:
        assert self.policy is not None
        self._read_channel(worker, drain=True)  # its last request count
        self._close_channel(worker)
        self.policy.exited(worker, status, time.monotonic())

    def _watcher_exited(self, status: int) -> None:
        assert self.policy is not None and self._watcher is not None
        fd = self._watcher.fileno()
        if fd is not None and self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._watcher.close()
        self._watcher = None
        if self.policy.stopping:
            return  # it shares our fate (a signal to the process group): nothing to replace
        self.log.warning("The file watcher process %s; falling back to polling.", describe_status(status))
        from supervisor.watch import PathFilter, PollingWatcher

        cfg = self.config
        self._watcher = PollingWatcher(cfg.reload_dirs or [os.getcwd()], PathFilter(cfg.reload_include, cfg.reload_exclude))

    def _handle_signals(self) -> None:
        assert self.policy is not None
        while self._signals:
            signum = self._signals.pop(0)
            if signum != signal.SIGCHLD:  # _reap runs every iteration
                self.policy.command(signum, time.monotonic())

    def _check_watcher(self) -> None:
        assert self.policy is not None
        if self._watcher is None or self.policy.stopping:
            return
        changed = self._watcher.poll()
        if changed:
            shown = ", ".join(os.path.relpath(p) for p in changed[:3])
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            self.log.warning("Detected changes in %s%s; restarting the workers.", shown, more)
            self.policy.reload("file change", time.monotonic())

    def _tick(self, policy: Policy) -> None:
        now = time.monotonic()
        if self._watchdog and now >= self._next_watchdog_at:
            self._notifier.notify("WATCHDOG=1")  # the loop is turning: that is what systemd asks
            self._next_watchdog_at = now + self._watchdog
        policy.tick(now)
        if self._watcher is not None and self._watcher.fileno() is None and now >= self._next_poll_at:
            self._next_poll_at = now + self.config.reload_interval
            self._check_watcher()

    # ------------------------------------------------------------------ forking

    def _fork(self, spawn: Spawn) -> None:
        assert self.policy is not None and self._selector is not None
        worker = spawn.worker
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(read_fd)
            os.close(write_fd)
            self.policy.start_failed(worker, f"cannot fork: {exc.strerror}", time.monotonic())
            return
        if pid == 0:
            self._become_worker(spawn, read_fd, write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._fds[worker] = read_fd
        self._selector.register(read_fd, selectors.EVENT_READ, worker)
        self.policy.started(worker, pid, time.monotonic())

    # ------------------------------------------------------------------ templates (--preload)

    def _fork_template(self, template: Template) -> None:
        assert self.policy is not None and self._selector is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            ours.close()
            theirs.close()
            self.log.error("Cannot start the template: %s.", exc.strerror)
            self.policy.template_exited(template, None, time.monotonic())
            return
        if pid == 0:
            def main() -> int:
                child.reset_process([ours.fileno(), *self._inherited_fds()], self.config.reopen_logs)
                set_title(template_title(self.config.proc_name, template.generation, self.config.label))
                privileges.drop(self._identity)  # the app is imported as the workers' user
                return forkserver.Template(theirs, self.target, self.sockets, self.config, self.pid, self.log,
                                           template.generation).run()

            child.run_child(main)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        theirs.close()
        handle = self._templates[template] = TemplateHandle(ours, pid)
        self._selector.register(handle.fileno(), selectors.EVENT_READ, template)
        self.policy.template_started(template, pid, time.monotonic())

    def _spawn_from(self, template: Template, spawn: Spawn) -> None:
        """Ask ``template`` to fork ``spawn.worker``; its pid comes in the reply."""
        assert self.policy is not None and self._selector is not None
        worker = spawn.worker
        handle = self._templates.get(template)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        request = SpawnRequest(next(self._request_ids), _spec(spawn))
        try:
            if handle is None:
                raise OSError(0, "its template is gone")
            handle.spawn(request, write_fd)
        except OSError as exc:
            os.close(read_fd)
            self.policy.start_failed(worker, f"cannot ask the template: {exc.strerror}", time.monotonic())
            return
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._fds[worker] = read_fd
        self._selector.register(read_fd, selectors.EVENT_READ, worker)
        self._spawning[request.id] = (worker, template)

    def _read_template(self, template: Template) -> None:
        assert self.policy is not None
        handle = self._templates.get(template)
        replies = handle.read() if handle is not None else None
        for words in replies or ():
            now = time.monotonic()
            if words[0] == "ready":
                self.policy.template_ready(template, now)
            elif words[0] in ("spawned", "failed") and len(words) == 3 and words[1].isdigit():
                worker, _ = self._spawning.pop(int(words[1]), (None, None))
                if worker is None:
                    continue
                if words[0] == "failed":
                    self._close_channel(worker)
                    self.policy.start_failed(worker, words[2], now)
                    continue
                self.policy.started(worker, int(words[2]), now)
                status = self._early_exits.pop(int(words[2]), None)
                if status is not None:  # it exited before we knew its pid
                    self._worker_exited(worker, status)
        if replies is None and handle is not None and self._selector is not None:
            try:
                self._selector.unregister(handle.fileno())  # it exited: _reap does the rest
            except (KeyError, ValueError):
                pass

    def _template_exited(self, template: Template, status: int) -> None:
        assert self.policy is not None
        self._read_template(template)  # the replies it sent before it exited
        handle = self._templates.pop(template, None)
        if handle is not None:
            if self._selector is not None:
                try:
                    self._selector.unregister(handle.fileno())
                except (KeyError, ValueError):
                    pass
            handle.close()
        now = time.monotonic()
        for request_id, (worker, source) in list(self._spawning.items()):
            if source is template:  # asked for, never forked
                del self._spawning[request_id]
                self._close_channel(worker)
                self.policy.start_failed(worker, "its template exited before forking it", now)
        self.policy.template_exited(template, status, now)

    def _become_worker(self, spawn: Spawn, read_fd: int, write_fd: int) -> NoReturn:
        """In the child: never returns."""

        def main() -> int:
            worker = spawn.worker
            child.reset_process([read_fd, *self._inherited_fds()], self.config.reopen_logs)
            set_title(worker_title(self.config.proc_name, worker.number, self.config.label))
            privileges.drop(self._identity)
            context = _spec(spawn).context(self.sockets, write_fd, self.pid)
            return child.run_target(self.target, context, self.log)

        child.run_child(main)

    def _inherited_fds(self) -> list[int]:
        """The master's descriptors a child must close (other channels, wakeup, selector...)."""
        fds = list(self._fds.values()) + [handle.fileno() for handle in self._templates.values()]
        fds += self._watched  # services' listeners and connections
        if self._wakeup is not None:
            fds += [end.fileno() for end in self._wakeup]
        if self._selector is not None and hasattr(self._selector, "fileno"):
            fds.append(self._selector.fileno())  # type: ignore[attr-defined]
        if self._notifier.enabled:
            fds.append(self._notifier.fileno())
        if self._watcher is not None and self._watcher.fileno() is not None:
            fds.append(self._watcher.fileno())  # type: ignore[arg-type]
        return fds

    def _unregister(self, worker: Worker) -> None:
        fd = self._fds.get(worker)
        if fd is not None and self._selector is not None:
            try:
                self._selector.unregister(fd)
            except (KeyError, ValueError):
                pass

    def _close_channel(self, worker: Worker) -> None:
        self._unregister(worker)
        fd = self._fds.pop(worker, None)
        self._buffers.pop(worker, None)
        if fd is not None:
            os.close(fd)


def _spec(spawn: Spawn) -> WorkerSpec:
    worker = spawn.worker
    return WorkerSpec(worker.number, worker.generation, worker.requests_limit, worker.spawned_at, spawn.boot_estimate,
                      spawn.rate_estimate, worker.lifetime_limit)


def _describe_socket(sock: socket.socket) -> str:
    from supervisor.sockets import describe

    try:
        return describe(sock)
    except OSError:
        return f"fd {sock.fileno()}"


def run(
    target: WorkerTarget,
    sockets: list[socket.socket],
    config: SupervisorConfig | None = None,
    *,
    logger: logging.Logger | None = None,
) -> int:
    """Supervise workers running ``target`` on ``sockets`` until stopped; return the exit code."""
    return Master(target, sockets, config, logger=logger).run()
