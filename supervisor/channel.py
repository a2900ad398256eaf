"""The worker → master channel: one pipe per worker, newline-terminated ASCII messages.

Vocabulary (each message is far below PIPE_BUF, so a write is atomic)::

    ready                     the worker accepts connections (after app import and lifespan startup)
    heartbeat <n> [k=v ...]   the event loop is alive; n = requests served so far; more counters
                              may follow as key=value fields (a master keeps the last ones)
    nearing <n> [eta=S]       n requests served, its budget about S seconds away at its current
                              rate: start my replacement now (``supervisor.budget``)
    holding <n> [reason=R]    n requests served; at its budget (R: max_requests or max_lifetime)
                              before its replacement was ready: it accepts nothing new and waits
                              to be retired, or told to serve on (``supervisor.budget``)
    retiring [reason=R]       the worker stopped accepting and will exit after its in-flight work
                              (R: why, e.g. max_requests)

A line is ``<kind>[ <count>][ key=value ...]``. The master skips what it does not understand
(an unknown kind, a malformed field), so a newer worker can say more than an older master knows.

The master talks back with signals only (HUP: retire gracefully while the others serve; TERM:
stop gracefully, the whole server is stopping; QUIT: stop quickly; USR1: reopen logs; USR2:
log a memory report; ABRT: you look hung, dump your stacks; ``child.HANDOVER_SIGNAL``: your
replacement is ready, stop at your budget; ``child.SERVE_ON_SIGNAL``: your replacement could not
start, serve on), so the channel stays one-way and the
worker never blocks on it: the write end is non-blocking and a full pipe drops the message (a
later heartbeat says the same thing again).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

READY = "ready"
HEARTBEAT = "heartbeat"
RETIRING = "retiring"
NEARING = "nearing"
HOLDING = "holding"
KINDS = (READY, HEARTBEAT, RETIRING, NEARING, HOLDING)
COUNTED = (HEARTBEAT, NEARING, HOLDING)  # kinds whose second word is a count
MAX_LINE = 4000  # below PIPE_BUF (4096): one write, never interleaved with another
ADOPTION_TIMEOUT = 2.0  # seconds a worker forked by a template waits to become the master's child


@dataclass(frozen=True)
class Message:
    kind: str
    requests: int | None = None
    fields: dict[str, str] = field(default_factory=dict)


def encode(kind: str, requests: int | None = None, **fields: object) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"Unknown channel message kind {kind!r}.")
    words = [kind]
    if kind in COUNTED:
        words.append(str(int(requests or 0)))
    for key, value in fields.items():
        text = str(value)
        if not key.isidentifier() or not text or any(c.isspace() for c in text):
            raise ValueError(f"Channel field {key}={text!r} must be a name and a value without spaces.")
        words.append(f"{key}={text}")
    line = (" ".join(words) + "\n").encode("ascii")
    if len(line) > MAX_LINE:
        raise ValueError(f"Channel message of {len(line)} bytes is over {MAX_LINE}.")
    return line


def decode(buffer: bytes) -> tuple[list[Message], bytes]:
    """Split complete lines off ``buffer``; return the messages and the unfinished tail.

    Lines the master does not understand are skipped: a newer worker may say more than an
    older master knows, and a garbled line must never stop the master.
    """
    *lines, rest = buffer.split(b"\n")
    messages = []
    for line in lines:
        words = line.decode("ascii", "replace").split()
        if not words or words[0] not in KINDS:
            continue
        kind, words = words[0], words[1:]
        count = None
        if kind in COUNTED:
            if not words or not words[0].isdigit():
                continue
            count, words = int(words[0]), words[1:]
        fields = {}
        for word in words:
            key, sep, value = word.partition("=")
            if sep and key.isidentifier() and value:
                fields[key] = value
        messages.append(Message(kind, count, fields))
    return messages, rest[-MAX_LINE:]


class Channel:
    """The worker's end. Every method returns False once the master is gone.

    ``adopted`` False: the worker was forked by a process that is exiting so that the master,
    a child subreaper, becomes its parent (``supervisor.forkserver``); the first message waits
    for that (at most ADOPTION_TIMEOUT), since the parent is how a worker knows its master."""

    def __init__(self, fd: int, master_pid: int, adopted: bool = True) -> None:
        self.fd = fd
        self.master_pid = master_pid
        self.adopted = adopted
        os.set_blocking(fd, False)

    def ready(self) -> bool:
        return self._send(encode(READY))

    def heartbeat(self, requests: int = 0, **fields: object) -> bool:
        return self._send(encode(HEARTBEAT, requests, **fields))

    def nearing(self, requests: int, eta: float) -> bool:
        return self._send(encode(NEARING, requests, eta=f"{min(eta, 1e6):.3f}"))

    def holding(self, requests: int, reason: str) -> bool:
        return self._send(encode(HOLDING, requests, reason=reason))

    def retiring(self, reason: str | None = None) -> bool:
        return self._send(encode(RETIRING, reason=reason) if reason else encode(RETIRING))

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
        if not self.adopted:
            self.adopted = True
            deadline = time.monotonic() + ADOPTION_TIMEOUT
            while not self.master_alive() and time.monotonic() < deadline:
                time.sleep(0.0005)
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            return True  # master is busy; the message is dropped, the next one repeats it
        except OSError:
            return False  # EPIPE: the master is gone
        return self.master_alive()
