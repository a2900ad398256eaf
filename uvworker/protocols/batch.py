"""Outgoing bytes batched per turn of the event loop: one piece serving HTTP and WebSocket;
and the outbox, where whole responses of different connections wait to go out in a burst.

What a connection produces during one turn (the streamed pieces of a response, the echoes of
every message one read delivered) goes out in one write when the turn ends: a syscall per
batch, not per piece. A batch below ``JOIN_BELOW`` bytes is joined into one buffer; a larger
one goes out by reference in one writev, so a big payload is never copied next to its framing.
A batch that reaches its ``limit`` is written at once, so ``send()`` still meets backpressure.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from uvworker.metrics import Counters

JOIN_BELOW = 64 * 1024
# How many whole responses of different connections the outbox writes in one burst, at most
# (a loop turn's, if fewer). A peer on this host (a proxy, a load generator) as fast as wrk
# has taken each response before we have made the next, and waits for it asleep: each write
# wakes it, and the wake-up (an IPI to its CPU; on a VM, an exit) is paid in our write
# syscall. With eager starts (1024 connections) responses are written a whole request's work
# apart: perf put the wake-ups at 8.3% of our CPU there against 3.8% at 64, and wrk slept
# 0.35-0.47 times a request. A burst of back-to-back writes wakes it once: 16 made it 0.06
# (8: 0.12, 32: 0.03), and a burst's connections are still in cache when it is written (a
# whole turn's 1024 are not: holding those cost 3-4 us more user time a request).
BURST = 16


class WriteBatch:
    # One per connection, read for every response: what it reads is here, in one block.
    __slots__ = ("parts", "counted", "transport", "loop", "limit", "size")

    def __init__(self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        # The pieces batched, () while there are none: an empty list of each connection's own
        # would be one more object that every response reads.
        self.parts: list[bytes] | tuple[()] = ()
        # Whether it counts what it writes (CountingBatch). When not, and nothing is batched,
        # a caller that knows both may write one whole response to the transport itself
        # (Connection.batching).
        self.counted = False
        self.transport = transport
        self.loop = loop
        self.limit = limit
        self.size = 0

    def add(self, data: bytes) -> None:
        """Batch ``data``: written when this turn ends, or now if the batch reached its limit."""
        parts = self.parts
        if not parts:
            parts = self.parts = []
            self.loop.call_soon(self.flush)
        parts.append(data)  # type: ignore[union-attr]
        self.size += len(data)
        if self.size >= self.limit:
            self.flush()

    def write(self, data: bytes) -> None:
        """Write now: whatever is batched, then ``data``."""
        if self.parts:
            self.parts.append(data)  # type: ignore[union-attr]
            self.size += len(data)
            self.flush()
        else:  # the common case, one whole response: straight through
            self.transport.write(data)

    def writelines(self, pieces: tuple[bytes, ...]) -> None:
        """Write now: whatever is batched, then ``pieces`` (by reference, if large)."""
        self.parts = [*self.parts, *pieces]
        self.size += sum(map(len, pieces))
        self.flush()

    def flush(self) -> None:
        parts = self.parts
        if not parts:
            return
        transport = self.transport
        if not transport.is_closing():  # a connection dropped meanwhile discards its batch
            if len(parts) == 1:
                transport.write(parts[0])
            elif self.size < JOIN_BELOW:
                transport.write(b"".join(parts))
            else:
                transport.writelines(parts)  # consumed during the call: letting go after is safe
        self.parts = ()
        self.size = 0


class CountingBatch(WriteBatch):
    """A WriteBatch that adds what it writes to ``counters.sent`` (with --metrics-bind only:
    the plain one costs nothing extra)."""

    __slots__ = ("counters",)

    def __init__(
        self, transport: asyncio.WriteTransport, loop: asyncio.AbstractEventLoop, limit: int, counters: Counters
    ) -> None:
        super().__init__(transport, loop, limit)
        self.counters = counters
        self.counted = True

    def write(self, data: bytes) -> None:
        if not self.parts:  # else flush() counts it
            self.counters.sent += len(data)
        super().write(data)

    def flush(self) -> None:
        if self.parts and not self.transport.is_closing():
            self.counters.sent += self.size
        super().flush()


class Holder(Protocol):
    """What the outbox needs of a connection (a Connection)."""

    phase: int
    transport: asyncio.WriteTransport


class Outbox:
    """Whole responses of different connections (one outbox per server) written in a burst:
    once BURST are held, or when the loop turn ends. Until its response is written, what a
    connection writes, and its close, first has the outbox written (Connection.release);
    a connection's later tasks are loop callbacks after the turn's end."""

    __slots__ = ("held", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.held: list[tuple[Holder, bytes]] = []
        self.loop = loop
        self.scheduled = False

    def hold(self, conn: Holder, data: bytes) -> None:
        held = self.held
        held.append((conn, data))
        if len(held) >= BURST:
            self.write()
        elif not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._turn_end)

    def _turn_end(self) -> None:
        self.scheduled = False
        self.write()

    def write(self) -> None:
        held = self.held
        if held:
            self.held = []
            for conn, data in held:
                if conn.phase:  # else CLOSED (0): dropped meanwhile, its response goes nowhere
                    try:
                        conn.transport.write(data)
                    except RuntimeError:  # its transport closed under it: connection_lost is to come
                        pass
