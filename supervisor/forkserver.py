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
   a worker is forked twice: the template's child forks the worker and exits at once, and
   the orphaned worker is re-parented to the nearest subreaper — the master.
   Why not the alternatives:
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
5. Forked before it is asked for. The template keeps one *spare*: a worker forked ahead (the
   master's child already), asleep until a spawn request comes, which it claims and serves.
   On a busy machine a new process waits for a CPU before its first instruction (the
   scheduler puts it behind the tasks that are running, measured 20 ms at a load of 10 on 2
   cores, twice for a double fork), while a sleeping one that wakes runs at once. The
   template forks the next spare once this one is claimed: at once if another request waits,
   else SPARE_PAUSE later, so that the fork does not compete with the new worker's start. A
   spare leaves when its template does (a pipe's end of file), or when the master is gone.

Protocol
--------
One ``SOCK_SEQPACKET`` socketpair per template (message boundaries, and ``SCM_RIGHTS``)::

    template -> master   ready                        loaded the app; forks on request
    master -> template   spawn {json}  + [fd]         a worker; fd: its channel's write end
    template -> master   spawned <id> <pid>           the spare that read the request took it (the
                                                      master already holds the channel's read end)

The worker's channel is a pipe the master creates; only its write end travels (``SCM_RIGHTS``).
The listening sockets were inherited when the master forked the template. The template exits
when the master closes its end (or dies) and on SIGTERM. (A spare killed with a request in hand
never answers it; the master gives that worker up at its startup timeout.)
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import logging
import os
import select
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
from supervisor.proctitle import set_title, spare_title, worker_title

PR_SET_CHILD_SUBREAPER = 36
CLAIMED, GONE = b"c", b"g"  # spare -> template: took a spawn request; found the master gone
RESPARE_DELAY = 0.1  # seconds before a spare that died unclaimed is replaced
SPARE_PAUSE = 0.05  # seconds a claimed spare has the CPU to itself (its start) before the next fork
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
        generation: int = 1,
    ) -> None:
        self.control = control
        self.target = target
        self.sockets = sockets
        self.config = config
        self.master_pid = master_pid
        self.log = log
        self.generation = generation  # for the spare's title
        self._alive = -1  # the write end of the spares' watch on the template

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
        alive, self._alive = os.pipe()  # a spare's watch on us: end of file once we are gone
        while True:  # rule 5: one spare at a time, the next one once it is claimed
            claimed, claim = os.pipe()
            try:
                self._fork_spare(alive, claim, claimed)
            except OSError as exc:
                self.log.error("The template cannot fork a spare worker: %s.", exc.strerror)
                word = b""
            else:
                os.close(claim)
                word = os.read(claimed, 1)  # b"": it died unclaimed
            finally:
                os.close(claimed)
            if word == GONE:
                return 0
            if word == CLAIMED:  # the next spare: at once if a request waits, else once this one has started
                select.select([self.control], [], [], SPARE_PAUSE)
            else:
                time.sleep(RESPARE_DELAY)

    def _fork_spare(self, alive: int, claim: int, claimed: int) -> None:
        """Fork twice (rule 2): the forker forks the spare and exits, and the spare is the
        master's child before any request comes for it."""
        gc.freeze()  # what this loop allocated since: frozen too
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, child.MASTER_SIGNALS)  # until it serves
        try:
            forker = os.fork()
            if forker == 0:
                try:
                    if os.fork() == 0:
                        os.close(claimed)
                        os.close(self._alive)
                        child.run_child(lambda: self._spare(alive, claim))
                finally:
                    os._exit(0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.waitpid(forker, 0)

    def _spare(self, alive: int, claim: int) -> int:
        """In the spare: wait for a spawn request, claim it, become that worker."""
        set_title(spare_title(self.config.proc_name, self.generation, self.config.label))
        while True:
            ready, _, _ = select.select([self.control, alive], [], [])
            if alive in ready:
                return 0  # the template is gone: a reload is complete, or the master stops
            data, ancdata, _, _ = self.control.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4))
            fds = _received_fds(ancdata)
            if not data:
                os.write(claim, GONE)  # the master closed its end, or died
                return 0
            kind, _, payload = data.partition(b" ")
            if kind == b"spawn" and len(fds) == 1:
                break
            for fd in fds:
                os.close(fd)
        os.write(claim, CLAIMED)
        os.close(claim)
        os.close(alive)
        request = SpawnRequest.decode(payload)
        self.control.sendall(f"spawned {request.id} {os.getpid()}".encode())
        return self._serve(request, fds[0])

    def _serve(self, request: SpawnRequest, channel_fd: int) -> int:
        """The spare becomes the worker ``request`` asks for."""
        child.reset_process([self.control.fileno()], self.config.reopen_logs)
        gc.enable()
        set_title(worker_title(self.config.proc_name, request.spec.number, self.config.label))
        # Forked ahead, it is the master's child by now; if not yet, the channel's first
        # message waits for it.
        context = request.spec.context(self.sockets, channel_fd, self.master_pid, adopted=False)
        return child.run_target(self.target, context, self.log)


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
