"""A request's task whose first step runs at once, in the callback that read the request.

Why. One epoll wake-up with N readable connections runs every connection's ``data_received``
(read, parse, scope, cycle, task) and only then, in the next loop turn, every task's first
step (the app, the response). At 1024 connections a turn's requests are all alive at once,
1.9 KB each (tracemalloc, hello world) on top of 3.1 KB per connection: more than the 2 MB
L2 cache, so each request's objects have left it by the time its app runs. Run the app's
first step as soon as its request is parsed, and for most apps the whole response is done
while those objects are still in cache, and freed before the next connection is read: what
stays for the turn is the task, 0.6 KB. (Python 3.12 calls this an eager start; 3.11 has
none.) It costs ~3.3k instructions per request, so the transport uses it only above
``EAGER_ABOVE`` open connections (protocols.http), where the misses it saves cost more.

What stays exactly as with ``asyncio.Task(coro)``: the app runs in a real Task of its own,
which ``asyncio.current_task()`` returns from its first line; in the task's context (a copy
of the current one, or a fresh one with --reset-contextvars); a ``cancel()`` reaches the app
where it waits, whenever it comes; an exception that is not the app's (``run_asgi`` handles
those) ends the task, as it would have. What differs: the first step runs before the task's
own first step, which then hands the task what the app waits for, or ends it.

How. The task's coroutine is an ``Eager``: an object with the coroutine methods the task
calls, ``send`` and ``throw``, in slots. ``run`` makes the task current (as its step would),
runs the app's first step in the task's context, and then sets them: for an app that has
finished, an exhausted generator's (the task's first step ends the task, all in C); for one
that waits, a hand-over that gives the task what it waits for, and from then on the app
coroutine's own ``send`` and ``throw`` (every later step goes to the app without Python code).
An Eager in its finished state is the same for every task, so a connection keeps the one its
last task had for its next request, once no task holds it any more.
"""

from __future__ import annotations

from asyncio import Task, current_task
# What a Task's step calls to make itself current_task() (CPython's C versions; asyncio.tasks
# has them, in C or in Python, in every version this package supports).
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Callable, Coroutine, Generator
from contextvars import Context, copy_context
from sys import getrefcount
from typing import TYPE_CHECKING, Any, Protocol

from uvworker.protocols.connection import REQUEST_TASK
from uvworker.protocols.cycle import FINISHED

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

    from uvworker.config import Config
    from uvworker.protocols.connection import ServerState
    from uvworker.protocols.cycle import RequestCycle

_FINISHED = object()  # what next() gives back for an app that returned in its first step
_END_SEND, _END_THROW = FINISHED.send, FINISHED.throw  # a finished task's: it ends at once, in C


class Eager(Coroutine[Any, Any, None]):
    """A request task's coroutine (see the module's docstring); ``run`` sets its methods."""

    __slots__ = ("send", "throw")  # type: ignore[misc]  # the methods a Task calls, per task
    send: Callable[[Any], Any]  # type: ignore[assignment]
    throw: Callable[[BaseException], Any]  # type: ignore[assignment]

    def close(self) -> None:
        try:
            self.throw(GeneratorExit())
        except (GeneratorExit, StopIteration):
            pass

    def __await__(self) -> Generator[Any, None, None]:  # pragma: no cover - only a Task drives it
        raise TypeError("a request task's coroutine is not awaited")


class _Holder:
    __slots__ = ("eager",)


def _references_when_free() -> int:
    """What getrefcount says of an object that only one attribute holds, read into a local
    name (the attribute, the name, the argument: 3 on CPython 3.11): of an Eager only its
    connection holds in run, of a cycle only ServerState.spare holds (protocols.http); found
    the same way, on this interpreter."""
    holder = _Holder()
    holder.eager = object()
    eager = holder.eager
    return getrefcount(eager)


FREE = _references_when_free()


class Starter(Protocol):
    """What ``run`` needs of the connection that read the request (an HTTPConnection)."""

    loop: AbstractEventLoop
    state: ServerState
    config: Config
    eager: Eager | None  # the Eager of its last eager start, for the next one


def run(conn: Starter, cycle: RequestCycle) -> None:
    """``cycle``'s app in a task of its own, as ``conn.state.start_app`` makes it, set as
    ``cycle.task``; then the task's first step, now. Called from a loop callback."""
    loop = conn.loop
    if loop.get_task_factory() is not None:  # the app's factory makes the task
        cycle.task = conn.state.start_app(cycle.run_asgi(conn.state.app))
        return
    context = Context() if conn.config.reset_contextvars else copy_context()
    # The connection's Eager, in its finished state, if no task holds it any more: then the
    # eager start makes and frees no object but the task (an Eager made and freed costs ~700
    # instructions). A task of this connection's whose last step is still to come holds it
    # (a read in the same loop turn as the one before it: libuv reads a socket again while
    # bytes keep coming), or one that ended and that someone keeps: a new one then. A task
    # that waited has a hand-over in its Eager: the connection has let go of that one.
    eager = conn.eager
    if getrefcount(eager) != FREE:
        eager = conn.eager = Eager()
        eager.send, eager.throw = _END_SEND, _END_THROW
    # With loop=, as state.start_app: no getpid syscall for Task to find the running loop.
    task = cycle.task = Task(eager, loop=loop, name=REQUEST_TASK, context=context)
    try:
        _enter_task(loop, task)
        outer = None
    except RuntimeError:  # inside another task: it steps aside meanwhile (as 3.12's eager start)
        outer = current_task(loop)
        _leave_task(loop, outer)
        _enter_task(loop, task)
    coro = cycle.run_asgi(conn.state.app)
    try:
        pending = context.run(next, coro.__await__(), _FINISHED)
    except BaseException as exc:  # not the app's error (run_asgi handles those): the task's end
        eager.send = eager.throw = _Raise(exc)
        conn.eager = None  # (this one is the task's now)
        return
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    if pending is not _FINISHED:  # the app waits: the task's Eager is a hand-over from now on
        hand_over = _HandOver(eager, coro, pending)
        eager.send, eager.throw = hand_over.send, hand_over.throw
        conn.eager = None


class _HandOver:
    """The task's first step for an app that waits: the task gets what it waits for; every
    later step goes to the app's coroutine. A throw (a cancel before that step) goes to the
    app at once, where it waits."""

    __slots__ = ("eager", "coro", "pending")

    def __init__(self, eager: Eager, coro: Coroutine[Any, Any, None], pending: Any) -> None:
        self.eager, self.coro, self.pending = eager, coro, pending

    def _direct(self) -> Coroutine[Any, Any, None]:
        coro, eager = self.coro, self.eager
        eager.send, eager.throw = coro.send, coro.throw
        self.eager = self.coro = self.pending = None  # (no cycle left through this object)
        return coro

    def send(self, value: Any) -> Any:
        pending = self.pending
        self._direct()
        return pending

    def throw(self, exc: BaseException) -> Any:
        return self._direct().throw(exc)


class _Raise:
    """send/throw of a task whose app's first step raised a BaseException: it ends with it."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __call__(self, _: Any) -> Any:
        exc, self.exc = self.exc, None
        if exc is None:
            raise StopIteration
        raise exc
