"""Listening sockets: bind TCP or unix sockets, adopt an inherited fd, or take systemd's.

The master creates every listening socket once and keeps it open for its whole life; workers
inherit them through fork(), so connections queued in the kernel backlog while one worker
retires are accepted by the others.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from supervisor.config import SupervisorError

SD_LISTEN_FDS_START = 3
DEFAULT_BACKLOG = 2048


@dataclass
class Listener:
    sock: socket.socket
    name: str  # systemd's FileDescriptorName, or a description such as "127.0.0.1:8000"

    def describe(self) -> str:
        return describe(self.sock)


def describe(sock: socket.socket) -> str:
    address = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{address if isinstance(address, str) else address.decode(errors='replace')}"
    if sock.family == socket.AF_INET6:
        return f"[{address[0]}]:{address[1]}"
    return f"{address[0]}:{address[1]}"


def bind_tcp(host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    return sock


def bind_unix(path: str, backlog: int = DEFAULT_BACKLOG, mode: int | None = None) -> socket.socket:
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket left by a previous run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SupervisorError(f"Cannot listen on unix socket {path}: {exc.strerror or exc}.") from None
    return sock


def adopt_fd(fd: int) -> socket.socket:
    """A listening socket inherited as file descriptor ``fd`` (family and type are detected)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno in (errno.EBADF, errno.ENOTSOCK):
            raise SupervisorError(f"File descriptor {fd} is not an open socket.") from None
        raise
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise SupervisorError(f"File descriptor {fd} is not a stream socket.")
    os.set_inheritable(fd, False)
    return sock


def systemd_listeners(
    environ: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[Listener]:
    """Sockets passed by systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``).

    Returns [] when this process was not socket-activated. With ``unset``, the variables are
    removed so that nothing started later (workers, subprocesses) believes they are its own.
    """
    env = os.environ if environ is None else environ
    count = env.get("LISTEN_FDS")
    pid = env.get("LISTEN_PID")
    names = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not count:
        return []
    if not pid or not pid.isdigit() or int(pid) != os.getpid():
        return []  # meant for another process (e.g. our parent)
    if not count.isdigit():
        raise SupervisorError(f"LISTEN_FDS must be a number, not {count!r}.")
    labels = names.split(":") if names else []
    listeners = []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        sock = adopt_fd(fd)
        name = labels[index] if index < len(labels) and labels[index] else describe(sock)
        listeners.append(Listener(sock, name))
    return listeners


def select_named(listeners: list[Listener], names: list[str]) -> list[Listener]:
    """Keep the listeners whose systemd name is in ``names`` (all of them when names is empty)."""
    if not names:
        return listeners
    chosen = [listener for listener in listeners if listener.name in names]
    missing = sorted(set(names) - {listener.name for listener in chosen})
    if missing:
        raise SupervisorError(
            f"systemd passed no socket named {', '.join(missing)} "
            f"(LISTEN_FDNAMES has {', '.join(l.name for l in listeners) or 'none'})."
        )
    return chosen
