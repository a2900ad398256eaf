"""The supervisor's options, as one plain dataclass (the caller maps its own settings onto it)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# Exit codes of the master: a clean stop, a setup error (a live PID file, an unknown user), and
# workers that keep failing before they are ready. Defined here once; uvworker uses them too.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_STARTUP_FAILED = 3

DEFAULT_RELOAD_INCLUDE = ["*.py"]
DEFAULT_RELOAD_EXCLUDE = [".*", "*.py[cod]", "*~", "__pycache__", "node_modules", "venv"]


class Service(Protocol):
    """Something run in the master loop (see ``SupervisorConfig.services``)."""

    def start(self, master: Any) -> None: ...  # a supervisor.master.Master (no import: no cycle)

    def close(self) -> None: ...


class SupervisorError(Exception):
    """A problem the user can fix (a live PID file, an unknown user...); the message is a sentence."""


def default_workers(environ: dict[str, str] | None = None) -> int:
    """``$WEB_CONCURRENCY`` when set to a positive integer, else 1."""
    value = (os.environ if environ is None else environ).get("WEB_CONCURRENCY", "").strip()
    if not value:
        return 1
    try:
        workers = int(value)
    except ValueError:
        raise SupervisorError(f"WEB_CONCURRENCY must be a positive integer, not {value!r}.") from None
    if workers < 1:
        raise SupervisorError(f"WEB_CONCURRENCY must be a positive integer, not {value!r}.")
    return workers


def reopen_file_handlers() -> None:
    """Default USR1 action: reopen every ``logging.FileHandler`` (after logrotate moved the file)."""
    loggers = [logging.getLogger()] + [
        obj for obj in logging.Logger.manager.loggerDict.values() if isinstance(obj, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.acquire()
                try:
                    handler.close()
                    handler.stream = handler._open()
                finally:
                    handler.release()


@dataclass
class SupervisorConfig:
    # Capacity. ``None`` means $WEB_CONCURRENCY, else 1.
    workers: int | None = None
    # A serving worker that sends no heartbeat for this long is aborted (SIGABRT, then SIGKILL).
    timeout_worker: float = 30.0
    # How long a new worker may take to report ``ready`` (app import, lifespan startup).
    startup_timeout: float = 60.0
    # Bound for a graceful stop or a retirement; the worker enforces its own, this is the backstop.
    graceful_timeout: float = 30.0
    # The master's backstop beyond the graceful bound before it SIGKILLs (lifespan shutdown, exit).
    stop_margin: float = 3.0
    # Time between SIGABRT (traceback dump) and SIGKILL for a hung worker.
    abort_grace: float = 2.0
    # Recycling; 0 disables each one. Jitter spreads the limits so workers do not all go at once.
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_lifetime: float = 0.0
    max_lifetime_jitter: float = 0.0
    max_memory: float = 0.0  # MiB of the worker's own (unique) memory
    memory_samples: int = 3  # consecutive samples over the limit before recycling
    memory_interval: float = 1.0
    # At most this many replacements in flight (reload and recycling); None = about a quarter.
    rotate_at_once: int | None = None
    # A worker slot failing to start this many times in a row, before any worker ever became
    # ready, is a crash loop: the master stops with exit code 3.
    startup_attempts: int = 3
    # A fork server (``supervisor.forkserver``): when given, this is called once in a template
    # process (it imports the application; a non-zero result is its exit code), and every
    # worker is forked from the template; SIGHUP starts a new template first. Linux only.
    preload: Callable[[], int | None] | None = None
    # On SIGTERM, keep serving this long before stopping (``Policy.draining`` is true at once,
    # so a readiness probe can send load balancers elsewhere); a second SIGTERM stops at once.
    shutdown_delay: float = 0.0
    # Heartbeat fields that are counters: the master keeps the sums of exited workers' last
    # values (``supervisor.metrics``), so fleet totals never go backwards.
    counter_fields: tuple[str, ...] = ()
    # Run in the master loop beside the workers (e.g. a metrics endpoint): each ``start(master)``
    # is called once before the first fork and may ``master.watch()`` file descriptors;
    # ``close()`` when the master stops.
    services: list[Service] = field(default_factory=list)
    # Process management.
    pidfile: str | None = None
    user: str | int | None = None
    group: str | int | None = None
    umask: int | None = None
    # Development: restart workers (rolling, like HUP) when files change.
    reload: bool = False
    reload_dirs: list[str] = field(default_factory=list)
    reload_include: list[str] = field(default_factory=lambda: list(DEFAULT_RELOAD_INCLUDE))
    reload_exclude: list[str] = field(default_factory=lambda: list(DEFAULT_RELOAD_EXCLUDE))
    reload_interval: float = 0.5  # between two looks for changes (watchfiles: a pause after each batch)
    reload_watcher: str = "auto"  # "auto": watchfiles when installed, else "polling"
    # Process titles: "<proc_name>: master [<label>]", "<proc_name>: worker 2 [<label>]".
    proc_name: str = "supervisor"
    label: str = ""
    # Called in the master on SIGUSR1 (workers get the signal forwarded).
    reopen_logs: Callable[[], None] = reopen_file_handlers
    # Minimum time between two systemd STATUS= updates.
    status_interval: float = 2.0

    def resolved_workers(self) -> int:
        workers = default_workers() if self.workers is None else self.workers
        if workers < 1:
            raise SupervisorError(f"The number of workers must be at least 1, not {workers}.")
        return workers

    def resolved_rotate_at_once(self, workers: int) -> int:
        if self.rotate_at_once is not None:
            return max(1, self.rotate_at_once)
        return max(1, min(4, (workers + 3) // 4))
