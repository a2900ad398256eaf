"""A request's task whose first step runs at once, in the callback that read the request.

Why. One epoll wake-up with N readable connections runs every connection's ``data_received``
(read, parse, scope, cycle, task) and only then, in the next loop turn, every task's first
step (the app, the response). At 1024 connections a turn's requests are all alive at once,
1.9 KB each (tracemalloc, hello world) on top of 3.1 KB per connection: more than the 2 MB
L2 cache, so each request's objects have left it by the time its app runs. Run the app's
first step as soon as its request is parsed, and for most apps the whole response is done
while those objects are still in cache, and freed before the next connection is read: what
stays for the turn is the task, 0.6 KB. (Python 3.12 calls this an eager start; 3.11 has
none.) It costs ~4k instructions per request, so the transport uses it only above
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
"""

from __future__ import annotations

from asyncio import Task, current_task
from collections.abc import Callable, Coroutine, Generator
from contextvars import Context, copy_context
from typing import TYPE_CHECKING, Any

from uvworker.protocols.connection import REQUEST_TASK

if TYPE_CHECKING:
    from uvworker.protocols.connection import ServerState
    from uvworker.protocols.cycle import RequestCycle

try:  # what a Task's step calls to make itself current_task() (CPython's C versions)
    from asyncio.tasks import _enter_task, _leave_task
except ImportError:  # pragma: no cover - an interpreter without them: plain tasks
    _enter_task = _leave_task = None

AVAILABLE = _enter_task is not None
_FINISHED = object()  # what next() gives back for an app that returned in its first step


def _exhausted() -> Generator[None, None, None]:
    yield  # pragma: no cover - never resumed: only its methods' "finished" answers are used


_END = _exhausted()
_END.close()  # from now on send() raises StopIteration and throw(exc) raises exc, in C
_END_SEND, _END_THROW = _END.send, _END.throw


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


def run(state: ServerState, cycle: RequestCycle) -> None:
    """``cycle``'s app in a task of its own, as ``state.start_app`` makes it, set as
    ``cycle.task``; then the task's first step, now. Called from a loop callback."""
    loop = state.loop
    if loop.get_task_factory() is not None or not AVAILABLE:  # the app's factory makes the task
        cycle.task = state.start_app(cycle.run_asgi(state.app))
        return
    context = Context() if state.config.reset_contextvars else copy_context()
    eager = Eager()
    # With loop=, as state.start_app: no getpid syscall for Task to find the running loop.
    task = cycle.task = Task(eager, loop=loop, name=REQUEST_TASK, context=context)
    try:
        _enter_task(loop, task)
        outer = None
    except RuntimeError:  # inside another task: it steps aside meanwhile (as 3.12's eager start)
        outer = current_task(loop)
        _leave_task(loop, outer)
        _enter_task(loop, task)
    coro = cycle.run_asgi(state.app)
    try:
        pending = context.run(next, coro.__await__(), _FINISHED)
    except BaseException as exc:  # not the app's error (run_asgi handles those): the task's end
        eager.send = eager.throw = _Raise(exc)
        return
    finally:
        _leave_task(loop, task)
        if outer is not None:
            _enter_task(loop, outer)
    if pending is _FINISHED:
        eager.send, eager.throw = _END_SEND, _END_THROW
    else:
        hand_over = _HandOver(eager, coro, pending)
        eager.send, eager.throw = hand_over.send, hand_over.throw


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
