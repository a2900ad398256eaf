"""The worker → master channel: one pipe per worker, newline-terminated ASCII messages.

Vocabulary (each message is far below PIPE_BUF, so a write is atomic):

    ready\n            the worker accepts connections (after app import and lifespan startup)
    heartbeat <n>\n    the worker's event loop is alive; n = requests served so far
    retiring\n         the worker stopped accepting and will exit after its in-flight work

The master talks back with signals only (TERM: retire gracefully; QUIT: stop quickly; USR1:
reopen logs; ABRT: you look hung, dump your stacks), so the channel stays one-way and the worker never blocks on it: the write end is
non-blocking and a full pipe drops the message (a later heartbeat says the same thing again).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

READY = "ready"
HEARTBEAT = "heartbeat"
RETIRING = "retiring"


@dataclass(frozen=True)
class Message:
    kind: str
    requests: int | None = None


def encode(kind: str, requests: int | None = None) -> bytes:
    if kind == HEARTBEAT:
        return f"{HEARTBEAT} {int(requests or 0)}\n".encode("ascii")
    if kind in (READY, RETIRING):
        return f"{kind}\n".encode("ascii")
    raise ValueError(f"Unknown channel message kind {kind!r}.")


def decode(buffer: bytes) -> tuple[list[Message], bytes]:
    """Split complete lines off ``buffer``; return the messages and the unfinished tail.

    Lines the master does not understand are skipped: a newer worker may say more than an
    older master knows, and a garbled line must never stop the master.
    """
    *lines, rest = buffer.split(b"\n")
    messages = []
    for line in lines:
        parts = line.split()
        if not parts:
            continue
        kind = parts[0].decode("ascii", "replace")
        if kind in (READY, RETIRING) and len(parts) == 1:
            messages.append(Message(kind))
        elif kind == HEARTBEAT and len(parts) == 2 and parts[1].isdigit():
            messages.append(Message(kind, int(parts[1])))
    return messages, rest[-256:]


class Channel:
    """The worker's end. Every method returns False once the master is gone."""

    def __init__(self, fd: int, master_pid: int) -> None:
        self.fd = fd
        self.master_pid = master_pid
        os.set_blocking(fd, False)

    def ready(self) -> bool:
        return self._send(encode(READY))

    def heartbeat(self, requests: int = 0) -> bool:
        return self._send(encode(HEARTBEAT, requests))

    def retiring(self) -> bool:
        return self._send(encode(RETIRING))

    def master_alive(self) -> bool:
        # An orphan is re-parented (to init or a subreaper), so the parent pid changes.
        return os.getppid() == self.master_pid

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _send(self, data: bytes) -> bool:
        if self.fd < 0:
            return False
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            return True  # master is busy; the message is dropped, the next one repeats it
        except OSError:
            return False  # EPIPE: the master is gone
        return self.master_alive()
