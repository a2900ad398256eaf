"""Listening sockets: bind TCP or unix sockets, adopt an inherited fd, or take systemd's.

``listen()`` is the one way sockets are bound, for the standalone server and the supervisor alike.

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


class ListenError(SupervisorError):
    """A listening socket cannot be opened; the message names where and why."""


def where(host: str = "127.0.0.1", port: int = 0, uds: str | None = None, fd: int | None = None) -> str:
    """What ``listen()`` with these arguments listens on, for messages."""
    if fd is not None:
        return f"socket file descriptor {fd}"
    if uds:
        return f"unix socket {uds}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen(
    host: str = "127.0.0.1", port: int = 0, uds: str | None = None, fd: int | None = None,
    backlog: int = DEFAULT_BACKLOG, uds_mode: int | None = 0o666,
) -> socket.socket:
    """A listening socket: the inherited ``fd``, else the unix socket ``uds`` (replacing a stale
    one, then chmod ``uds_mode`` so that a front proxy running as another user can connect),
    else TCP ``host:port`` (SO_REUSEADDR, so a restart is not refused for TIME_WAIT; ``::`` is
    dual-stack where the system allows it). Raises ListenError."""
    sock = None
    try:
        if fd is not None:
            sock = adopt_fd(fd)
        elif uds:
            _remove_stale_socket(uds)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(uds)
            if uds_mode is not None:
                os.chmod(uds, uds_mode)
        else:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        sock.listen(backlog)
    except OSError as err:
        if sock is not None:
            if fd is not None:
                sock.detach()  # not ours to close
            else:
                sock.close()
        raise ListenError(f"cannot listen on {where(host, port, uds, fd)}: {err.strerror or err}") from err
    return sock


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file that nobody listens on (left by an earlier run); bind() reports the rest."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))


def adopt_fd(fd: int) -> socket.socket:
    """A stream socket inherited as file descriptor ``fd`` (its family is detected); OSError
    (EBADF, ENOTSOCK, or ESOCKTNOSUPPORT for a socket of another type) when it is not one."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(errno.ESOCKTNOSUPPORT, f"file descriptor {fd} is not a stream socket")
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
        try:
            sock = adopt_fd(fd)
        except OSError as err:
            raise ListenError(f"systemd's socket {fd} cannot be used: {err.strerror or err}") from None
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
