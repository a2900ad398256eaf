"""``--preload`` as a fork server: the application is loaded once, in a template process, and
every worker (initial, recycled, crashed, added by TTIN) is forked from it, ready in milliseconds.

Rules this module keeps
-----------------------
1. The master stays small, app-free and single-threaded: it forks the template (a child that
   loads the application once) and never loads the application itself. A reload loads the new
   code in a new template; the policy goes on with the reload only once that one is ready.
2. The master stays the parent of every worker, so it reaps, signals and reads their channels
   exactly as for workers it forks itself, and a template that dies takes no worker with it.
   How: the master is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux 3.4+) and
   the template forks twice: its child forks the worker and exits at once, and the orphaned
   worker is re-parented to the nearest subreaper — the master. Why not the alternatives:
   ``clone(CLONE_PARENT)`` would make the worker the master's child directly, but Python can
   only fork through ``os.fork`` (which runs the interpreter's own fork hooks; a raw clone via
   ctypes would not); and a template that reaps its workers and relays their exit statuses
   would be a second source of truth, whose death would orphan the fleet.
3. Copy-on-write pages stay shared: ``gc.freeze()`` moves every object the import created to
   a generation the collector never visits, so a worker's collections do not write to (and so
   copy) the template's pages. The template keeps its collector off after the import (it
   allocates next to nothing); every worker turns its own back on.
4. Nothing runs in the template but the import: no event loop (each worker runs its own, and
   its lifespan startup), no thread of ours.

Protocol
--------
One ``SOCK_SEQPACKET`` socketpair per template (message boundaries, and ``SCM_RIGHTS``)::

    template -> master   ready                        loaded the app; forks on request
    master -> template   spawn {json}  + [fd]         fork a worker; fd: its channel's write end
    template -> master   spawned <id> <pid>           forked (the master already holds the read end;
                         failed <id> <reason>         the intermediate process sends these)

The worker's channel is a pipe the master creates; only its write end travels (``SCM_RIGHTS``).
The listening sockets were inherited when the master forked the template. The template exits
when the master closes its end (or dies) and on SIGTERM.
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NoReturn

from supervisor import child
from supervisor.config import SupervisorConfig, SupervisorError
from supervisor.proctitle import set_title, worker_title

PR_SET_CHILD_SUBREAPER = 36
REPARENT_TIMEOUT = 2.0  # seconds a new worker waits to become the master's child
MAX_MESSAGE = 65536


def become_subreaper() -> None:
    """Make this process the parent of every orphaned descendant (rule 2)."""
    if not sys.platform.startswith("linux"):
        raise SupervisorError("--preload needs Linux (a child subreaper keeps the workers the supervisor's).")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise SupervisorError(f"--preload: cannot become a child subreaper: {os.strerror(error)}.")


@dataclass(frozen=True)
class SpawnRequest:
    """What the template needs to fork one worker; ``id`` pairs the reply with the request."""

    id: int
    spec: child.WorkerSpec

    def encode(self) -> bytes:
        return json.dumps({"id": self.id, **asdict(self.spec)}).encode()

    @classmethod
    def decode(cls, data: bytes) -> SpawnRequest:
        fields = json.loads(data)
        return cls(fields.pop("id"), child.WorkerSpec(**fields))


# -- the master's side ------------------------------------------------------------------------


class TemplateHandle:
    """The master's end of one template's control socket."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock = sock
        self.pid = pid
        sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def spawn(self, request: SpawnRequest, channel_fd: int) -> None:
        """Ask for a worker; raises OSError if the template cannot be told."""
        fds = array.array("i", [channel_fd])
        self.sock.sendmsg([b"spawn " + request.encode()],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])

    def read(self) -> list[list[str]] | None:
        """The replies waiting (each split in words); None once the template closed its end."""
        replies = []
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return replies
            except OSError:
                data = b""
            if not data:
                return None if not replies else replies
            replies.append(data.decode("ascii", "replace").split(" ", 2))

    def close(self) -> None:
        self.sock.close()


# -- the template's side ----------------------------------------------------------------------


def _leave(signum: int, frame: object) -> None:
    raise SystemExit(0)


class Template:
    """Runs in the template process (forked by the master): load the app, then fork workers."""

    def __init__(
        self,
        control: socket.socket,
        target: child.WorkerTarget,
        sockets: list[socket.socket],
        config: SupervisorConfig,
        master_pid: int,
        log: logging.Logger,
    ) -> None:
        self.control = control
        self.target = target
        self.sockets = sockets
        self.config = config
        self.master_pid = master_pid
        self.log = log

    def run(self) -> int:
        """Load the application, then serve spawn requests until the master lets go; the exit code."""
        try:
            return self._run()
        except SystemExit as exc:  # SIGTERM, SIGINT, SIGQUIT: leave now
            return exc.code if isinstance(exc.code, int) else 0

    def _run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(signum, _leave)
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):  # the master's business
            signal.signal(signum, signal.SIG_IGN)  # (each worker resets them)
        assert self.config.preload is not None
        code = run_preload(self.config.preload)
        if code:
            return code
        gc.disable()  # rule 3
        gc.freeze()
        if threading.active_count() > 1:
            self.log.warning(
                "The application started %d thread(s) while it was imported; workers forked from the "
                "template do not have them (and may inherit a lock one of them held): start threads "
                "in lifespan startup, in each worker.", threading.active_count() - 1)
        self.control.sendall(b"ready")
        while True:
            try:
                data, ancdata, _, _ = self.control.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
            except InterruptedError:
                continue
            fds = _received_fds(ancdata)
            if not data:
                return 0  # the master closed its end, or died
            kind, _, payload = data.partition(b" ")
            if kind != b"spawn" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            request = SpawnRequest.decode(payload)
            try:
                self._fork(request, fds[0])
            finally:
                os.close(fds[0])

    def _fork(self, request: SpawnRequest, channel_fd: int) -> None:
        """Fork twice (rule 2). The intermediate process tells the master the worker's pid
        itself, then exits: the fewest processes between the request and the worker."""
        gc.freeze()  # what this loop allocated since: frozen too
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, child.MASTER_SIGNALS)
        try:
            middle = os.fork()
            if middle == 0:
                code = 1
                try:
                    worker = os.fork()
                    if worker == 0:
                        self._become_worker(request, channel_fd)
                    self.control.sendall(f"spawned {request.id} {worker}".encode())
                    code = 0
                except OSError as exc:
                    self.control.sendall(f"failed {request.id} cannot fork: {exc.strerror}".encode())
                    code = 0
                finally:
                    os._exit(code)
        except OSError as exc:
            self.control.sendall(f"failed {request.id} cannot fork: {exc.strerror}".encode())
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        _, status = os.waitpid(middle, 0)
        if status:  # it died before it could say anything
            self.control.sendall(f"failed {request.id} the intermediate process died (wait status {status})".encode())

    def _become_worker(self, request: SpawnRequest, channel_fd: int) -> NoReturn:
        """In the worker: never returns."""

        def main() -> int:
            child.reset_process([self.control.fileno()], self.config.reopen_logs)
            gc.enable()
            set_title(worker_title(self.config.proc_name, request.spec.number, self.config.label))
            deadline = time.monotonic() + REPARENT_TIMEOUT
            while os.getppid() != self.master_pid:  # the intermediate is exiting (rule 2)
                if time.monotonic() > deadline:
                    return 1  # the master is gone
                time.sleep(0.0005)
            context = request.spec.context(self.sockets, channel_fd, self.master_pid)
            return child.run_target(self.target, context, self.log)

        child.run_child(main)


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def run_preload(preload: Callable[[], int | None]) -> int:
    """Call ``preload`` and turn what it raised into an exit code (its traceback logged)."""
    try:
        return preload() or 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
