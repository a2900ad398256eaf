"""Checks that a connection's objects are freed by reference counting, not by the collector.

A test turns the cyclic collector off (``collector_off``), takes weak references to the
server's objects while they live (``weak``), ends the connection its way, and then waits for
every one of them to go (``assert_freed``). Only an object left in a reference cycle
outlives that wait: with a new connection per request, such cycles made the collector a
fifth of the server's CPU time.
"""

from __future__ import annotations

import contextlib
import gc
import time
import types
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tests.conftest import wait_for

if TYPE_CHECKING:
    from tests.conftest import RunningServer

Refs = list[weakref.ref[Any]]


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """No cyclic collection meanwhile: whatever is freed is freed by reference counting."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def weak(*objects: Any) -> Refs:
    """Weak references to ``objects`` (None is skipped)."""
    return [weakref.ref(obj) for obj in objects if obj is not None]


def assert_freed(refs: Refs, timeout: float = 5.0) -> None:
    """Wait (with a deadline) until every object of ``refs`` is gone, then check that the
    collector finds nothing of the server's in cyclic garbage (objects no weak reference was
    taken to); else name the survivors. A client object of h2's that is still in use is not
    garbage: the check is made while the test's client is alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [type(obj).__qualname__ for obj in (ref() for ref in refs) if obj is not None]
        if not alive:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"still alive after {timeout} s without the collector: {', '.join(alive)}")
        time.sleep(0.01)
    garbage = server_garbage()
    assert not garbage, f"in reference cycles: {', '.join(garbage)}"


SERVER_PACKAGES = ("uvworker", "h11", "h2", "hpack", "httptools", "websockets")


def server_garbage() -> list[str]:
    """The objects of the server's packages that only a collection frees: those alive before
    it and gone after it. (Counting what the collection finds unreachable would miss a cycle
    through a suspended generator: the generator's finalizer breaks it, and what it held is
    freed uncounted.)"""
    alive = []
    for obj in gc.get_objects():
        if type(obj).__module__.partition(".")[0] in SERVER_PACKAGES:
            try:
                alive.append((type(obj).__qualname__, weakref.ref(obj)))
            except TypeError:  # no weak references to it (__slots__): what holds it is checked
                pass
    for _ in range(3):  # a cycle whose finalizers ran is freed by the next collection
        gc.collect()
    return [name for name, ref in alive if ref() is None]


def open_connection_objects(srv: RunningServer) -> Refs:
    """Weak references to the server's one open connection, its core and its parser."""
    conns = wait_for(lambda: list(srv.server.state.connections))  # type: ignore[union-attr]
    assert len(conns) == 1
    conn = conns[0]
    return weak(conn, conn.core, conn.parser)
