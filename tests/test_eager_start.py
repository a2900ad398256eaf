"""A request's app task started eagerly (uvworker.protocols.eager: above EAGER_ABOVE open
connections its first step runs in the callback that read the request) behaves exactly as a
plain task: every test here runs on both paths (``start``), with both parsers, and checks
which path it took (the task's coroutine), so that neither can pass for the other."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
import weakref
from typing import Any

import pytest

from tests.benchmarks.instructions import Transport
from tests.conftest import PARSERS, wait_for
from tests.freed import assert_freed, collector_off, open_connection_objects
from tests.http_client import Conn, build_request, capture_log, parse_responses, read_body, respond
from uvworker.protocols import eager, http
from uvworker.protocols.eager import Eager

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="unset")


@pytest.fixture(params=["plain", "eager"])
def start(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "eager":
        monkeypatch.setattr(http, "EAGER_ABOVE", 0)  # every connection counts as "many"
    return request.param


def started_as(task: asyncio.Task[Any] | None) -> str:
    assert isinstance(task, asyncio.Task)
    return "eager" if isinstance(task.get_coro(), Eager) else "plain"


def test_current_task_and_context_are_the_requests_own(serve: Any, start: str) -> None:
    """current_task() is a real Task from the app's first line, a new one per request, named
    as before, on the server's loop and listed by all_tasks(); a context variable set by one
    request is not seen by the next."""
    seen: list[tuple[Any, str, str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None and task in asyncio.all_tasks() and task.get_loop() is asyncio.get_running_loop()
        before = REQUEST_ID.get()
        REQUEST_ID.set(scope["path"])
        await asyncio.sleep(0)  # a later step: the same task and context
        assert asyncio.current_task() is task and REQUEST_ID.get() == scope["path"]
        seen.append((task, started_as(task), task.get_name(), before))
        await respond(send, body=b"ok")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for target in ("/a", "/b", "/c"):
            conn.send(build_request(target=target))
            assert conn.read_response().body == b"ok"
    assert len({id(task) for task, *_ in seen}) == 3
    assert [(how, name, before) for _, how, name, before in seen] == [(start, "uvworker.request", "unset")] * 3


def test_an_app_that_waits_for_its_body_gets_it(serve: Any, start: str) -> None:
    """The app's first step ends waiting for body that has not come: the task takes over
    where it waits (the hand-over), and the body sent later reaches it."""
    waiting = threading.Event()
    paths: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        paths.append(started_as(asyncio.current_task()))
        body = b""
        while True:
            waiting.set()
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await respond(send, body=body.upper())

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        wait_for(waiting.is_set)
        conn.send(b"world")
        assert conn.read_response().body == b"HELLOWORLD"
    assert paths == [start]


def test_a_waiting_app_is_cancelled_where_it_waits(serve: Any, start: str) -> None:
    """--timeout-request cancels an app that waits (here before the task's own first step
    could matter: the app awaits at once): it sees CancelledError, the client a 504."""
    events: list[str] = []
    cancelled = threading.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        events.append(started_as(asyncio.current_task()))
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            events.append("cancelled")
            cancelled.set()
            raise

    with serve(app, timeout_request=0.3) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response(timeout=5).status == 504
        wait_for(cancelled.is_set)
    assert events == [start, "cancelled"]


def test_an_app_that_fails_at_once_gets_a_500(serve: Any, start: str) -> None:
    paths: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        paths.append(started_as(asyncio.current_task()))
        raise ValueError("boom")

    with capture_log() as records, serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        response = conn.read_response()
        assert response.status == 500 and conn.closed_within(3) == b""
    assert paths == [start]
    assert [r.getMessage() for r in records if r.levelname == "ERROR"] == ["Exception in ASGI application"]


def test_pipelined_requests_are_answered_in_order(serve: Any, start: str) -> None:
    """The first request of a read starts as ``start`` says; the ones held behind it start
    from inside the previous app's task, always as plain tasks."""
    paths: list[tuple[str, str]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        paths.append((scope["path"], started_as(asyncio.current_task())))
        await respond(send, body=scope["path"].encode())

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"".join(build_request(target=f"/{n}") for n in range(3)))
        data = conn.read_until(b"/2", deadline=time.monotonic() + 5)
    assert [r.body for r in parse_responses(data)] == [b"/0", b"/1", b"/2"]
    assert paths == [("/0", start), ("/1", "plain"), ("/2", "plain")]


def test_a_task_factory_still_makes_the_tasks(serve: Any, start: str) -> None:
    """Once the app sets a task factory, the factory makes request tasks, as plain tasks."""
    made: list[asyncio.Task[Any]] = []
    seen: list[tuple[asyncio.Task[Any] | None, str]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, context=context)
        made.append(task)
        return task

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        seen.append((task, started_as(task)))
        if scope["path"] == "/factory":
            asyncio.get_running_loop().set_task_factory(factory)
        elif scope["path"] == "/reset":
            asyncio.get_running_loop().set_task_factory(None)
        await respond(send, body=b"ok")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for target in ("/", "/factory", "/made", "/reset", "/again"):
            conn.send(build_request(target=target))
            assert conn.read_response().body == b"ok"
    assert [how for _, how in seen] == [start, start, "plain", "plain", start]
    assert made == [task for task, _ in seen[2:4]]


def test_reset_contextvars_gives_an_empty_context(serve: Any, start: str) -> None:
    seen: list[tuple[str, str]] = []
    REQUEST_ID.set("server")  # in the test thread: not the server's; set in its loop below

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((started_as(asyncio.current_task()), REQUEST_ID.get()))
        REQUEST_ID.set("leak")
        await respond(send, body=b"ok")

    with serve(app, reset_contextvars=True) as srv, Conn.open(srv.host, srv.port) as conn:
        for _ in range(2):
            conn.send(build_request())
            assert conn.read_response().body == b"ok"
    assert seen == [(start, "unset")] * 2


@pytest.mark.parametrize("reset", [False, True])
def test_a_task_factory_is_given_the_requests_context(serve: Any, start: str, reset: bool) -> None:
    """A task factory is called as create_task calls it: with a fresh context under
    --reset-contextvars (the app's task runs in it), else without one (a copy of the
    current context, the factory's default). Tasks made without a factory are named."""
    given: list[Any] = []
    seen: list[tuple[str, str, str]] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__qualname__", "") == "RequestCycle.run_asgi":  # not the server's own tasks
            given.append(kwargs.get("context"))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        seen.append((started_as(task), task.get_name(), REQUEST_ID.get()))
        REQUEST_ID.set("leak")
        if scope["path"] == "/factory":
            asyncio.get_running_loop().set_task_factory(factory)
        await respond(send, body=b"ok")

    with serve(app, reset_contextvars=reset) as srv, Conn.open(srv.host, srv.port) as conn:
        for target in ("/factory", "/made", "/made"):
            conn.send(build_request(target=target))
            assert conn.read_response().body == b"ok"
    assert len(given) == 2
    assert all(isinstance(context, contextvars.Context) for context in given) if reset else given == [None, None]
    assert seen[0][:2] == (start, "uvworker.request")
    assert [how for how, _, _ in seen[1:]] == ["plain", "plain"]
    assert [value for _, _, value in seen] == ["unset"] * 3  # nothing leaks from one request to the next


def test_a_cancel_in_the_first_step_reaches_the_app_where_it_then_waits(serve: Any, start: str) -> None:
    """A cancel() before the task's own first step (here: the app cancels its task, then
    waits): the app gets CancelledError where it waits, as from a plain task."""
    events: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        events.append(started_as(task))
        assert task is not None and task.cancel()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            events.append("cancelled")
            task.uncancel()
        await respond(send, body=b"caught")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().body == b"caught"
    assert events == [start, "cancelled"]


def test_a_cancelled_error_raised_at_once_ends_the_task_cancelled(serve: Any, start: str) -> None:
    """An exception that is not the app's (run_asgi passes it on), raised in the first step:
    the client gets a 500 and the task ends with it (cancelled), as a plain task would."""
    tasks: list[asyncio.Task[Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        raise asyncio.CancelledError("at once")

    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request())
        assert conn.read_response().status == 500
        wait_for(lambda: tasks and tasks[0].done())
    assert started_as(tasks[0]) == start and tasks[0].cancelled()


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many Eager objects the eager start has made (one item each)."""
    count: list[int] = []

    class Counted(Eager):
        __slots__ = ()

        def __init__(self) -> None:
            count.append(1)

    monkeypatch.setattr(eager, "Eager", Counted)
    return count


def reporting_app(made: list[int], kept: list[asyncio.Task[Any]] | None = None) -> tuple[Any, list[Any], list[Any]]:
    """An app that answers its path and its body, and the lists it reports to: (path, how its
    task started, Eager objects made so far) as it starts, (path, result) as its task ends.
    It holds no task (a done callback reports), but for the task of /keep, kept in ``kept``."""
    seen: list[tuple[str, str, int]] = []
    ended: list[tuple[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        task = asyncio.current_task()
        assert task is not None
        seen.append((path, started_as(task), len(made)))
        task.add_done_callback(lambda done: ended.append((path, done.result())))
        if path == "/keep" and kept is not None:
            kept.append(task)
        del task
        await respond(send, body=path.encode() + await read_body(receive))

    return app, seen, ended


def test_a_connections_requests_share_an_eager_coroutine_only_once_its_task_lets_go(
    serve: Any, start: str, made: list[int]
) -> None:
    """The eager start keeps a connection's Eager for its next request: the one of a task
    that ended (and that nobody keeps) is used again; the one of a task that waited (a
    hand-over since), or of a task the app keeps, is not. Every request is answered and
    every task ends with its app, whichever way it started. (Nothing here holds a task but
    the app of /keep: the tasks report through done callbacks.)"""
    kept: list[asyncio.Task[Any]] = []
    app, seen, ended = reporting_app(made, kept)

    paths = ["/a", "/b", "/wait", "/c", "/keep", "/d"]
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for path in paths:
            if path == "/wait":
                conn.send(b"POST /wait HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
                wait_for(lambda: len(seen) == 3)
                conn.send(b"!!!")
                assert conn.read_response().body == b"/wait!!!"
            else:
                conn.send(build_request(target=path))
                assert conn.read_response().body == path.encode()
            wait_for(lambda: len(ended) == len(seen))  # (as a client's next request would come)
    assert ended == [(path, None) for path in paths]
    # Eager objects made by each request's start: /a makes one, which /b and /wait use again
    # (their tasks had let go); /wait's app waits, so it is a hand-over since and /c makes
    # one, which /keep uses; /keep's app keeps its task, which holds it: /d makes one.
    expected = [1, 1, 1, 2, 2, 3] if start == "eager" else [0] * 6
    assert seen == [(path, start, count) for path, count in zip(paths, expected)]


class _Transport(Transport):
    """The instruction counter's transport, keeping what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data


@pytest.mark.parametrize("parser", PARSERS)
def test_a_request_read_in_the_turn_of_the_one_before_gets_an_eager_coroutine_of_its_own(
    parser: str, monkeypatch: pytest.MonkeyPatch, made: list[int]
) -> None:
    """Two requests of one connection read in one loop turn (libuv reads a socket again
    within its callback while bytes keep coming, so this is driven on the protocol: no
    socket makes it happen at will): the first one's app has finished, but its task's last
    step comes in the next turn and still holds its Eager when the second one starts. The
    second, whose app waits for its body, must not take it over: both tasks end as plain
    ones would, with their apps' answers in order."""
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    app, seen, ended = reporting_app(made)

    async def main() -> tuple[bytes, bytes]:
        config = Config(app, http=parser, access_log=False, lifespan="off")
        config.load()
        loop = asyncio.get_running_loop()
        transport = _Transport()
        conn = HTTPConnection(make_state(config, loop, {}))
        conn.connection_made(transport)

        def one_turn() -> None:
            conn.data_received(build_request(target="/1"))
            conn.data_received(b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")

        loop.call_soon(one_turn)
        for _ in range(20):  # a few turns: the first task ends, the second waits for its body
            await asyncio.sleep(0)
        first = transport.written
        conn.data_received(b"hello")
        deadline = loop.time() + 5
        while len(ended) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return first, transport.written

    first, written = asyncio.run(main())
    assert [r.body for r in parse_responses(first)] == [b"/1"]
    assert [(r.status, r.body) for r in parse_responses(written)] == [(200, b"/1"), (200, b"/2hello")]
    assert seen == [("/1", "eager", 1), ("/2", "eager", 2)]  # an Eager each
    assert sorted(ended) == [("/1", None), ("/2", None)]


@pytest.mark.parametrize("keep", ["nothing", "receive", "send"])
def test_a_cycle_serves_the_next_request_once_nothing_holds_it(
    serve: Any, monkeypatch: pytest.MonkeyPatch, keep: str
) -> None:
    """Many connections open (the eager start): a request's cycle serves the next request
    once nothing holds it (ServerState.spare); an app that keeps its receive or send keeps
    its cycle, which then acts for its own request only (its response is complete), and the
    next request gets a new one."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    last: list[weakref.ref[Any]] = []  # the cycle of the request before (not held)
    reused: list[bool] = []
    kept: list[Any] = []
    seen_by_kept: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        cycle = receive.__self__
        reused.append(bool(last) and last[-1]() is cycle)
        last.append(weakref.ref(cycle))
        del cycle
        if scope["path"] == "/keep" and keep != "nothing":
            kept.append(receive if keep == "receive" else send)
        if scope["path"] == "/after" and kept:
            try:
                message = {"type": "http.response.start", "status": 200}
                seen_by_kept.append(await (kept[0]() if keep == "receive" else kept[0](message)))
            except RuntimeError as exc:
                seen_by_kept.append(str(exc))
        await respond(send, body=b"ok")

    paths = ["/a", "/b", "/keep", "/after", "/c"]
    with serve(app) as srv, Conn.open(srv.host, srv.port) as conn:
        for path in paths:
            conn.send(build_request(target=path))
            assert conn.read_response().body == b"ok"
    # /a makes one, which /b and /keep use again; /after gets a new one while /keep's app
    # holds its receive or send (and uses it: its own request's cycle), /c uses /after's.
    assert reused == [False, True, True, keep == "nothing", True]
    if keep == "receive":
        assert seen_by_kept == [{"type": "http.disconnect"}]
    elif keep == "send":
        assert seen_by_kept == ["Unexpected ASGI message 'http.response.start' after the response completed"]


def test_a_closed_connection_is_not_kept_by_the_spare_cycle(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spare cycle of a connection that has gone lets go of it: freed at once."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await respond(send, body=b"ok")

    with serve(app) as srv, collector_off():
        with Conn.open(srv.host, srv.port) as conn:
            objects = open_connection_objects(srv)
            conn.send(build_request())
            assert conn.read_response().body == b"ok"
            assert srv.server.state.spare is not None
        assert_freed(objects)
