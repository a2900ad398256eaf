"""What a worker is doing: its requests in flight, for the report of a worker that looks hung.

When the heartbeat stops (standalone: the supervisor's --timeout-worker; under Gunicorn: its
``timeout``) the worker gets SIGABRT. faulthandler writes every thread's stack first, from C;
then a Python signal handler logs this report: each request in flight (method, path, client,
seconds since its head arrived) and where the main thread is stuck, so the operator sees which
endpoint blocked the event loop.

The report reads the server's connection registry (``ServerState.connections``) without any
book of its own, so serving pays nothing for it. A signal handler runs in the main thread,
between two bytecodes of the code that blocks the loop, so the registry cannot change while it
is read.

A loop blocked inside C code that never returns to Python (a database driver waiting on a
lock, retrying its own interrupted system calls) never runs that handler. For it a
``Watchdog`` thread writes the same report once the loop has not swept for about half the heartbeat
timeout (``watchdog_delay``), before the abort: that C code has released the GIL, so the thread runs, and the loop,
being blocked, changes nothing it reads. (Code that blocks while holding the GIL gets
faulthandler's stacks only.)
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from uvworker.protocols.connection import ServerState

HEARTBEAT_INTERVAL = 1.0  # seconds between two calls of the server's on_tick: the heartbeat
STACK_LIMIT = 12  # innermost frames of the main thread: where the app is stuck, not how it got there


def in_flight(state: ServerState | None, now: float | None = None) -> list[str]:
    """One line per request (or WebSocket session) in flight, the oldest first."""
    if state is None:
        return []
    now = time.perf_counter() if now is None else now
    records: dict[int, Any] = {}
    for conn in list(state.connections):
        for record in conn.in_flight():
            records[id(record)] = record
    lines = []
    for record in sorted(records.values(), key=lambda r: r.start_clock):
        scope = record.scope
        method = scope.get("method") or scope.get("type", "?").upper()
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client and client[1] is not None else (client[0] if client else "-")
        lines.append(f"{method} {scope.get('path', '')} from {who}, {now - record.start_clock:.1f} s")
    return lines


def hung_report(state: ServerState | None, frame: FrameType | None) -> str:
    """Where the main thread is stuck (its innermost frames) and the requests in flight."""
    where = "".join(traceback.format_stack(frame, limit=STACK_LIMIT)) if frame is not None else "  (unknown)\n"
    requests = in_flight(state)
    lines = [f"the main thread was here:\n{where.rstrip()}", f"{len(requests)} request(s) in flight:"]
    return "\n".join(lines + [f"  {line}" for line in requests])


def on_abort(handler: Callable[[int, FrameType | None], Any]) -> None:
    """Run ``handler`` (a Python signal handler) on SIGABRT, after faulthandler's stacks."""
    # faulthandler chains to the handler it replaced (and disabling it puts that one back):
    # disable it, install ours, enable it again.
    faulthandler.disable()
    signal.signal(signal.SIGABRT, handler)
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (ValueError, OSError, AttributeError):
        pass  # stderr without a file descriptor: no stacks from C, the report still comes



def watchdog_delay(timeout: float) -> float:
    """How long the loop may stall before the watchdog reports, for a heartbeat ``timeout``.
    The supervisor (or Gunicorn's arbiter) counts from the last heartbeat, which can be up to
    HEARTBEAT_INTERVAL older than the stall, so the abort can come ``timeout - 1`` s into it:
    report at half of that (at least three sweeps in), well before."""
    return max(0.3, (timeout - HEARTBEAT_INTERVAL) / 2)


class Watchdog:
    """A daemon thread that logs the hung report when the server has not swept for ``after``
    seconds (once per blocking), so that the report comes even when no signal handler can run.
    It reads ``ServerState.swept_at``, which the sweep sets ten times a second."""

    def __init__(self, state: Callable[[], ServerState | None], after: float, log: Callable[[str], None]) -> None:
        self.state = state
        self.after = after
        self.log = log
        self.stopped = threading.Event()
        self.loop_thread = threading.get_ident()  # the thread running the event loop

    def start(self) -> None:
        if self.after > 0:
            threading.Thread(target=self._watch, name="uvworker-watchdog", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        reported = 0.0
        interval = min(1.0, max(0.05, self.after / 4))
        woke = resumed = time.monotonic()
        while not self.stopped.wait(interval):
            now, last = time.monotonic(), woke
            woke = now
            if now - last > interval + 1.0:
                # This thread overslept: the process was stopped (Ctrl-Z, SIGSTOP, docker
                # pause), and the loop with it; a stall counts from the resumption.
                resumed = now
            state = self.state()
            swept_at = state.swept_at if state is not None else 0.0
            blocked = time.monotonic() - max(swept_at, resumed)
            if swept_at and swept_at != reported and blocked >= self.after:
                reported = swept_at
                frame = sys._current_frames().get(self.loop_thread)
                self.log(f"The event loop has not turned for {blocked:.1f} s; {hung_report(state, frame)}")
