"""sd_notify(3) over ``$NOTIFY_SOCKET``, written out (a datagram of ``KEY=value`` lines).

Only the master talks to systemd (``NotifyAccess=main``); the variables are removed from the
environment so that workers and their subprocesses never notify on their own.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import MutableMapping


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants in ``MONOTONIC_USEC=`` with RELOADING=1."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    def __init__(self, address: str | None) -> None:
        self.address: str | bytes | None = None
        self._sock: socket.socket | None = None
        if address:
            # "@name" is an abstract-namespace socket: a leading NUL byte on the wire.
            self.address = b"\0" + address[1:].encode() if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> "Notifier":
        env = os.environ if environ is None else environ
        return cls(env.pop("NOTIFY_SOCKET", None))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram. Never raises: systemd going away is not
        a reason for the server to stop."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when disabled."""
    env = os.environ if environ is None else environ
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000
