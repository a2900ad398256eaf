"""Outgoing bytes batched per turn of the event loop: one piece serving HTTP and WebSocket.

What a connection produces during one turn (the streamed pieces of a response, the echoes of
every message one read delivered) goes out in one write when the turn ends: a syscall per
batch, not per piece. A batch below ``JOIN_BELOW`` bytes is joined into one buffer; a larger
one goes out by reference in one writev, so a big payload is never copied next to its framing.
A batch that reaches its ``limit`` is written at once, so ``send()`` still meets backpressure.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from uvworker.metrics import Counters

JOIN_BELOW = 64 * 1024


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
