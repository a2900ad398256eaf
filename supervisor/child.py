"""What runs in a forked worker before and after the worker target.

The child starts as a copy of the master: the master's signal handlers, its wakeup pipe, its
selector and the read ends of every other worker's channel. All of that is undone here before
the target runs, so the target sees a clean process: default signal dispositions, its sockets,
its channel, its title, its user. The child always leaves through ``os._exit`` so that nothing
registered by the master (atexit, PID file removal, buffered output) runs twice.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from supervisor.channel import Channel

# Signals the master handles; they are blocked across fork() and reset in the child.
MASTER_SIGNALS = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD,
)
# Master -> worker "retire: stop accepting and finish, the others go on serving" (SIGTERM says the
# whole server stops: the worker then closes idle keep-alive connections at once).
RETIRE_SIGNAL: int = signal.SIGHUP
# Master -> worker "your replacement is ready: stop accepting once you reach your request
# budget (now, if you are past it)". A real-time signal: no terminal or tool sends it by
# accident, and SIGWINCH (which a terminal resize sends the whole process group) would.
HANDOVER_SIGNAL: int = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGWINCH  # (no RT signals on macOS)
# Master -> worker "your replacement could not start: accept again if you hold at your limit,
# and serve on until a replacement is ready" (``supervisor.budget``, rule 2).
SERVE_ON_SIGNAL: int = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else getattr(signal, "SIGINFO", 29)
# Master -> worker "log where your memory grew" (a worker recycled for memory gets it first;
# SIGUSR2 to the master is forwarded to every worker).
REPORT_SIGNAL: int = signal.SIGUSR2
# Signals whose default action would kill a worker that does not handle them: a worker gets a
# no-op handler for each (Python handlers are reset by exec, unlike SIG_IGN, so the app's
# subprocesses are not affected); a target that cares installs its own.
OPTIONAL_SIGNALS = (HANDOVER_SIGNAL, SERVE_ON_SIGNAL, REPORT_SIGNAL)
# The master's scaling signals reach the workers too when sent to the process group or by name
# (``pkill -TTIN uvworker``); their default action would stop a worker (in a shell's job) until
# SIGCONT: it gets the same no-op handler.
SCALING_SIGNALS = (signal.SIGTTIN, signal.SIGTTOU)


@dataclass
class WorkerContext:
    """Handed to the worker target in the child."""

    number: int  # stable slot number: a replacement gets the number of the worker it replaces
    generation: int  # bumped by every reload
    sockets: list[socket.socket]
    channel: Channel
    master_pid: int
    # The request count after which the master will recycle this worker (0: never), and its
    # lifetime in seconds from ready (0: none). A worker that keeps them exactly asks for its
    # replacement ahead of time and stops accepting at the limit (``supervisor.budget``); one
    # that does not is replaced once its heartbeats show the limit reached (or its lifetime
    # is over), and retired when the replacement is ready.
    requests_limit: int = 0
    lifetime_limit: float = 0.0
    # When the master decided to start this worker (time.monotonic(), the same clock in every
    # process) and the longest recent boot (start to ready) of the fleet's workers, in seconds
    # (0: none measured yet): the worker's own boot and this estimate how early to ask.
    spawned_at: float = 0.0
    boot_estimate: float = 0.0
    # The highest request rate of the fleet's recent workers (requests per second; 0: unknown),
    # for planning the budget before the worker has measured its own rate.
    rate_estimate: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


WorkerTarget = Callable[[WorkerContext], "int | None"]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is started with, besides its sockets and channel (a template gets it as JSON)."""

    number: int
    generation: int
    requests_limit: int
    spawned_at: float
    boot_estimate: float
    rate_estimate: float = 0.0
    lifetime_limit: float = 0.0

    def context(self, sockets: list[socket.socket], channel_fd: int, master_pid: int,
                adopted: bool = True) -> WorkerContext:
        """``adopted``: the master is already our parent (else: soon, ``Channel``)."""
        return WorkerContext(
            number=self.number, generation=self.generation, sockets=sockets,
            channel=Channel(channel_fd, master_pid, adopted), master_pid=master_pid,
            requests_limit=self.requests_limit, spawned_at=self.spawned_at, boot_estimate=self.boot_estimate,
            rate_estimate=self.rate_estimate, lifetime_limit=self.lifetime_limit,
        )


def run_child(main: Callable[[], int]) -> NoReturn:
    """In a freshly forked child (a worker, a template): run ``main``, exit with its code."""
    code = 1
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
    finally:
        exit_child(code)


def reset_process(close_fds: list[int], reopen_logs: Callable[[], None] | None = None) -> None:
    """Undo what the child inherited from the master (signals stay blocked until the end).

    SIGUSR1 gets ``reopen_logs`` rather than its default action (which ends the process): the
    master may forward one while the child starts, before the target installs its own."""
    signal.set_wakeup_fd(-1)
    for signum in MASTER_SIGNALS:
        handler: Any = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        if signum == signal.SIGUSR1 and reopen_logs is not None:
            handler = lambda signum, frame: reopen_logs()  # noqa: E731
        signal.signal(signum, handler)
    for signum in OPTIONAL_SIGNALS + SCALING_SIGNALS:
        signal.signal(signum, _ignore)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    # SIGABRT from the master means "you look hung": dump every thread's stack to stderr.
    if sys.stderr is not None:
        try:
            faulthandler.enable(file=sys.stderr, all_threads=True)
        except (ValueError, OSError, AttributeError):
            pass  # stderr without a file descriptor: no dump, the abort still works
    signal.pthread_sigmask(signal.SIG_UNBLOCK, MASTER_SIGNALS)


def _ignore(signum: int, frame: object) -> None:
    pass


def run_target(target: WorkerTarget, context: WorkerContext, log: logging.Logger) -> int:
    try:
        result = target(context)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except BaseException:
        log.error("Worker %d crashed:\n%s", context.number, traceback.format_exc().rstrip())
        return 1
    return result if isinstance(result, int) else 0


def exit_child(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            try:
                handler.flush()
            except Exception:
                pass
    os._exit(code & 0xFF)
