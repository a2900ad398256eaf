"""Development ``--reload``: notice source changes and tell the master loop.

Two implementations with one face (``fileno()`` for the selector or ``None``, ``poll()`` returning
the changed paths):

- ``WatchfilesWatcher`` when ``watchfiles`` is installed. watchfiles runs threads, and the master
  must stay single-threaded to fork safely, so it runs in a small helper process that writes
  changed paths to a pipe the master selects on.
- ``PollingWatcher`` otherwise: the master compares modification times on its timer.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

from supervisor.child import SCALING_SIGNALS


class PathFilter:
    def __init__(self, include: list[str], exclude: list[str]) -> None:
        self.include = include
        self.exclude = exclude

    def _matches(self, path: str, patterns: list[str]) -> bool:
        name = os.path.basename(path)
        return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(path, p) for p in patterns)

    def wants_dir(self, path: str) -> bool:
        return not self._matches(path, self.exclude)

    def wants_file(self, path: str) -> bool:
        return self._matches(path, self.include) and not self._matches(path, self.exclude)

    def wants(self, path: str) -> bool:
        """For a path reported by watchfiles: no part of it may be excluded."""
        parts = Path(path).parts
        if any(self._matches(part, self.exclude) for part in parts[:-1] if part not in ("/", "")):
            return False
        return self.wants_file(path)


class PollingWatcher:
    def __init__(self, dirs: list[str], path_filter: PathFilter) -> None:
        self.dirs = [os.path.abspath(d) for d in dirs]
        self.filter = path_filter
        self.mtimes = self._snapshot()

    def fileno(self) -> int | None:
        return None

    def _walk(self) -> Iterator[str]:
        for root_dir in self.dirs:
            for root, dirs, files in os.walk(root_dir):
                dirs[:] = [d for d in dirs if self.filter.wants_dir(d)]
                for name in files:
                    if self.filter.wants_file(name):
                        yield os.path.join(root, name)

    def _snapshot(self) -> dict[str, float]:
        mtimes = {}
        for path in self._walk():
            try:
                mtimes[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
        return mtimes

    def poll(self) -> list[str]:
        current = self._snapshot()
        changed = sorted(p for p in current.keys() | self.mtimes.keys() if current.get(p) != self.mtimes.get(p))
        self.mtimes = current
        return changed

    def close(self) -> None:
        pass


class WatchfilesWatcher:
    def __init__(self, dirs: list[str], path_filter: PathFilter, delay: float = 0.0) -> None:
        self.filter = path_filter
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        master_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # helper process
            os.close(read_fd)
            code = 0
            try:
                code = self._run(dirs, write_fd, master_pid, delay)
            finally:
                os._exit(code)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.pid = pid
        self.fd = read_fd
        self._buffer = b""

    @staticmethod
    def _run(dirs: list[str], fd: int, master_pid: int, delay: float) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        for signum in SCALING_SIGNALS:  # the master's: stopping on one would end the watching
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        import watchfiles

        for changes in watchfiles.watch(*dirs, rust_timeout=1000, yield_on_timeout=True):
            if os.getppid() != master_pid:
                return 0  # the master is gone
            if not changes:
                continue
            # One write per batch, so that the master reads it as one change (one reload).
            batch = b"".join(path.encode("utf-8", "surrogateescape") + b"\n" for _change, path in changes)
            try:
                os.write(fd, batch)
            except OSError:
                return 0
            time.sleep(delay)  # one look per delay, as the polling watcher; watchfiles keeps collecting
        return 0

    def fileno(self) -> int | None:
        return self.fd

    def poll(self) -> list[str]:
        try:
            while chunk := os.read(self.fd, 65536):
                self._buffer += chunk
        except BlockingIOError:
            pass
        *lines, self._buffer = self._buffer.split(b"\n")
        paths = {line.decode("utf-8", "surrogateescape") for line in lines if line}
        return sorted(p for p in paths if self.filter.wants(p))

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.close(self.fd)


def make_watcher(
    dirs: list[str], include: list[str], exclude: list[str], kind: str = "auto", delay: float = 0.0
) -> PollingWatcher | WatchfilesWatcher:
    path_filter = PathFilter(include, exclude)
    dirs = dirs or [os.getcwd()]
    # find_spec, not import: the master must not load watchfiles (and its threads) itself.
    if kind == "polling" or importlib.util.find_spec("watchfiles") is None:
        return PollingWatcher(dirs, path_filter)
    return WatchfilesWatcher(dirs, path_filter, delay)
