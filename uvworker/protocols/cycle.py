"""One ASGI HTTP request cycle over a stream: ``receive`` and ``send`` for the app.

The cycle knows ASGI, not the wire. It talks to a :class:`Stream` — an HTTP/1.1 exchange or an
HTTP/2 stream — which frames what it is given and owns the connection's flow control. Rules
this module keeps:

* ASGI messages are checked here, once for every protocol: the order (start, then body pieces,
  nothing after the last), the status (200-599; 1xx are the server's to send), the types.
* Request body is buffered up to ``BODY_HIGH_WATER``; beyond it the stream is told to stop
  reading until the app calls ``receive()`` (backpressure), and every piece the app takes is
  reported (``body_consumed``), so a stream with a window (HTTP/2) can reopen it.
* ``send()`` waits (``drain``) only while the stream says writing is paused.
* After the client has gone, ``send()`` raises :class:`ClientDisconnected` (an ``OSError``)
  and ``receive()`` returns ``http.disconnect``. After a half-close (HTTP/1.1: the client's
  FIN behind its whole request) ``receive()`` says so too, but ``send()`` still sends.
* An app that fails, or returns without finishing its response, gets the stream's ``fail``:
  a 500 if nothing is out yet, else the stream is cut (a client must never mistake a partial
  response for a whole one).
* The ASGI extensions (asgiref "Extensions") are checked here too; a protocol advertises in
  ``scope["extensions"]`` only those its stream carries:
  ``http.response.early_hint`` before the first body piece (later ones are dropped: the final
  head is out); ``http.response.pathsend`` instead of any body piece (the cycle opens the
  file, the stream sends it); ``http.response.trailers`` after the last body piece of a
  response started with ``trailers: True``; until the last of them (``more_trailers``
  false) the response is not complete, and the stream keeps the message open for them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol, TypeVar

from uvworker.errors import ClientDisconnected

logger = logging.getLogger("uvworker.error")

BODY_HIGH_WATER = 64 * 1024
_clock = time.perf_counter
_NO_HEADERS: list[tuple[bytes, bytes]] = []  # shared, never changed: a cycle replaces it

# The extension names a protocol lists in scope["extensions"] (each with an empty dict).
PATHSEND, EARLY_HINT, TRAILERS = "http.response.pathsend", "http.response.early_hint", "http.response.trailers"
_BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]").search

Headers = list[tuple[bytes, bytes]]
_F = TypeVar("_F", bound=Callable[..., Any])


class Stream(Protocol):
    """What a protocol offers one request's cycle."""

    loop: asyncio.AbstractEventLoop
    write_paused: bool  # send() waits in drain() while this is true

    def send_continue(self) -> None:
        """The app asks for body the client waits to send (Expect: 100-continue)."""

    def want_body(self) -> None:
        """The app waits for body: make it flow (and bound how long it may stall)."""

    def pause_body(self) -> None:
        """Enough body is buffered: stop taking more from the client."""

    def body_consumed(self, size: int) -> None:
        """The app took ``size`` bytes of body: room for more."""

    def send_start(self, status: int, headers: Any) -> None:
        """The response head (raises RuntimeError for headers that cannot be sent)."""

    def send_body(self, cycle: RequestCycle, body: bytes, more: bool) -> None:
        """A piece of the response body; ``more`` false ends the response."""

    async def drain(self) -> None:
        """Return once the client takes data again (or is gone)."""

    def send_early_hint(self, links: list[bytes]) -> None:
        """A 103 Early Hints with these Link field values (checked: bytes, no CR, LF or NUL).
        Called only before the first body piece; a protocol or client that cannot take one
        (an HTTP/1.0 client) drops it."""

    async def send_file(self, cycle: RequestCycle, fd: int, size: int, more: bool) -> None:
        """The whole body is the first ``size`` bytes of the regular file open at ``fd``
        (the cycle closes it after). The app's Content-Length, if any, must be ``size``;
        without one the stream frames the body by ``size`` (a HEAD answer too). ``more``: the
        app's trailers follow (``send_trailers``). Returns once the bytes are written or the
        client is gone; counts them in ``cycle.bytes_sent``."""

    def send_trailers(self, cycle: RequestCycle, headers: Headers) -> None:
        """End a response whose last body piece said ``more`` because the app announced
        trailers: with these fields if the request accepted them (``TE: trailers``) and the
        framing has room, else without them. Either way the response is complete."""

    def fail(self, cycle: RequestCycle) -> None:
        """The app cannot complete its response: 500 if nothing is out yet, else cut it."""


def _exhausted() -> Generator[None, None, None]:
    yield  # pragma: no cover - never resumed: only the finished generator's methods are used


# A generator that has finished: iter() gives itself, send() ends it at once (StopIteration,
# or a return for a C caller), throw(exc) raises exc; all in C, without a Python frame.
FINISHED = _exhausted()
FINISHED.close()


class Done(Coroutine[Any, Any, None]):
    """What send() returns once its work is done: awaiting it returns None at once, without a
    Python frame (``__await__`` is the finished generator's ``__iter__``). A Coroutine, so
    that asyncio.create_task and anyio take it as a coroutine; stateless: one object serves
    every call, task and loop."""

    __slots__ = ()
    __await__ = FINISHED.__iter__  # type: ignore[assignment]
    send = FINISHED.send  # type: ignore[assignment]
    throw = FINISHED.throw  # type: ignore[assignment]

    def close(self) -> None:
        pass


DONE = Done()


async def _raise(exc: BaseException) -> None:
    """An error of send()'s call, raised where the app awaits it."""
    raise exc


def _coroutine_function(function: _F) -> _F:
    """Marks ``function`` (which returns a coroutine) as a coroutine function for those who
    ask: inspect.iscoroutinefunction from 3.12 on, asyncio's before (asgiref's async_to_sync
    warns about anything else)."""
    if hasattr(inspect, "markcoroutinefunction"):
        return inspect.markcoroutinefunction(function)
    function._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]
    return function


class RequestCycle:
    """The ASGI side of one request."""

    # Slots: a cycle per request, so no dict (compact values) to make and free, and every
    # attribute at a fixed offset; each is set in __init__ (which HTTP/1.1 may call again on a
    # finished cycle: protocols.http, on_request). The classes that keep a dict (the
    # HTTP/2 and WebSocket connections) set every attribute in __init__ too, none as a class default:
    # CPython 3.11 fixes the attribute names an instance can keep in its compact values
    # (shared with the other instances) after the first 30 instances are made. Objects come in
    # bursts (all the requests of one wake-up before any app runs), so a name first set later
    # makes every instance's dict a real one, and every attribute access after it slower. A
    # class default read through an instance is the generic lookup too.
    __slots__ = (
        "stream", "scope", "expect_continue", "start_clock", "chunks", "buffered", "more_body", "final_delivered",
        "disconnected", "half_closed", "waiter", "response_started", "response_complete", "status", "response_headers",
        "bytes_sent", "streaming", "trailers_pending", "trailer_fields", "task", "finished",
        "__weakref__",  # as any object's: tests (tests/freed.py) and tools watch cycles go
    )

    def __init__(
        self, stream: Stream, scope: dict[str, Any], expect_continue: bool = False, more_body: bool = True,
    ) -> None:
        self.stream = stream
        self.scope = scope
        self.expect_continue = expect_continue
        self.start_clock = _clock()
        self.chunks: list[bytes] | tuple[()] = ()
        self.buffered = 0
        self.more_body = more_body  # false: the request has no body, and has ended
        self.final_delivered = False
        self.disconnected = False
        self.half_closed = False  # the client sends nothing more, but may read the response
        self.waiter: asyncio.Future[None] | None = None
        self.response_started = False
        self.response_complete = False
        self.status = 0
        self.response_headers: Headers = _NO_HEADERS
        self.bytes_sent = 0
        self.streaming = False  # a body piece with more_body is out: no early hint, no pathsend now
        self.trailers_pending = False  # started with trailers: True; the last trailers are not sent yet
        self.trailer_fields: Headers = _NO_HEADERS
        self.task: asyncio.Future[None] | None = None  # the app's task (a WSGI exchange, served without one)
        self.finished = False  # reported to the server's books

    @property
    def start_time(self) -> float:
        """time.time() when the request began (for the logs: derived, not read per request)."""
        return time.time() - (_clock() - self.start_clock)

    # -- events from the stream ---------------------------------------------------------
    def on_body(self, data: bytes) -> None:
        if self.response_complete or self.disconnected:
            return  # the response is out: the rest of the body is not wanted
        if not self.chunks:
            self.chunks = []
        self.chunks.append(data)  # type: ignore[union-attr]
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.stream.pause_body()
        self._wake()

    def on_end(self) -> None:
        self.more_body = False
        if self.waiter is not None:  # most GETs end before the app asks for a body
            self._wake()

    def on_disconnect(self) -> None:
        self.disconnected = True
        self._wake()

    def on_half_close(self) -> None:
        """The client's FIN after its whole request: receive() says http.disconnect once the
        body is taken, send() still sends, and an app that stops is not at fault."""
        self.half_closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- ASGI ---------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any]:
        if self.expect_continue:
            self.expect_continue = False
            if self.more_body and not self.response_started:
                self.stream.send_continue()
        if not self.disconnected and not self.response_complete and not self.chunks:
            if self.more_body or self.final_delivered:
                if self.more_body:
                    self.stream.want_body()
                if not self.half_closed:
                    self.waiter = self.stream.loop.create_future()
                    await self.waiter
        if self.disconnected or self.response_complete or (self.half_closed and self.final_delivered):
            return {"type": "http.disconnect"}
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.chunks = ()
        if self.buffered:
            self.stream.body_consumed(self.buffered)
            self.buffered = 0
        self.final_delivered = not self.more_body
        return {"type": "http.request", "body": body, "more_body": self.more_body}

    @_coroutine_function
    def send(self, message: dict[str, Any]) -> Coroutine[Any, Any, None]:
        # Not a coroutine of its own (one made and run per call costs ~1.2k instructions):
        # the work is done in the call, and what the app awaits is DONE, or the drain while
        # the stream's writing is paused. What this raises is raised where the app awaits
        # it, as from a coroutine; a disconnected client and the uncommon messages go
        # through _send, a coroutine as before.
        try:
            kind = message["type"]
            if kind == "http.response.body" and self.response_started and not self.response_complete and not self.disconnected:
                stream = self.stream
                # `in`, then the item: a lookup or two, without the method call of get() (~100
                # instructions less; most last pieces have no more_body at all).
                if "more_body" in message and message["more_body"]:
                    self.streaming = True
                    stream.send_body(self, message.get("body", b""), True)
                    return stream.drain() if stream.write_paused else DONE
                self.response_complete = True
                if self.waiter is not None:
                    self._wake()
                # With trailers announced the message stays open for them.
                stream.send_body(self, message.get("body", b""), self.trailers_pending)
                return DONE
            if kind == "http.response.start" and not self.response_started and not self.disconnected:
                status = message["status"]
                if type(status) is not int or not 100 <= status <= 599:
                    raise RuntimeError(f"Invalid HTTP status {status!r}")
                if status < 200:
                    raise RuntimeError(f"Status {status} cannot be sent as a response; 1xx are the server's to send")
                headers = message.get("headers", ())
                send_start = self.stream.send_start  # often an attribute (see protocols.http CALLABLE_ATTRIBUTES)
                send_start(status, headers)
                self.status = status
                self.response_headers = headers if type(headers) is list else list(headers)
                self.response_started = True
                if "trailers" in message and message["trailers"]:
                    self.trailers_pending = True
                return DONE
        except Exception as exc:
            return _raise(exc)
        return self._send(message, kind)

    async def _send(self, message: dict[str, Any], kind: str) -> None:
        """send() of what is not a response's start or body piece, or to a client that has gone."""
        if self.disconnected:
            if kind.startswith("http.response"):
                raise ClientDisconnected("the client has disconnected")
            raise RuntimeError(f"Unexpected ASGI message {kind!r}")
        if kind == EARLY_HINT and not self.response_complete:
            links = list(message.get("links", ()))
            for link in links:
                if type(link) is not bytes or _BAD_FIELD_VALUE(link):
                    raise RuntimeError(f"Invalid early hint link {link!r}")
            if links and not self.streaming:
                self.stream.send_early_hint(links)
        elif kind == TRAILERS and self.trailers_pending and self.response_complete:
            self._send_trailers(message)
        elif kind == PATHSEND and self.response_started and not self.response_complete and not self.streaming:
            await self._send_path(message)
        elif self.response_complete:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} after the response completed")
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r}")

    def _send_trailers(self, message: dict[str, Any]) -> None:
        fields = list(message.get("headers", ()))
        if self.trailer_fields:
            fields = self.trailer_fields + fields
        if message.get("more_trailers", False):
            self.trailer_fields = fields
            return
        self.stream.send_trailers(self, fields)  # raises for fields that cannot be sent
        self.trailers_pending = False

    async def _send_path(self, message: dict[str, Any]) -> None:
        path = message.get("path")
        if type(path) is not str or not os.path.isabs(path):
            raise RuntimeError(f"http.response.pathsend needs an absolute path, not {path!r}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # OSError (a 500) for a missing file
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RuntimeError(f"http.response.pathsend: {path!r} is not a regular file")
            self.streaming = True  # nothing else may be mixed in
            await self.stream.send_file(self, fd, info.st_size, self.trailers_pending)
        finally:
            os.close(fd)
        self.response_complete = True
        self._wake()

    # -- running the app ----------------------------------------------------------------
    async def run_asgi(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except Exception as exc:
            if isinstance(exc, ClientDisconnected) or (self.disconnected and isinstance(exc, OSError)):
                return  # the app noticed the client left: nothing to report
            logger.error("Exception in ASGI application", exc_info=exc)
            self._fail()
        except BaseException:  # cancelled, or the process is exiting: not the app's error
            self._fail()
            raise
        else:
            if (not self.response_complete or self.trailers_pending) and not self.disconnected:
                if self.half_closed:  # told http.disconnect, it gave up: no error, and no answer
                    self.disconnected = self.response_complete = True
                    self.stream.fail(self)
                    return
                if not self.response_started:
                    logger.error("ASGI callable returned without starting a response.")
                elif self.response_complete:
                    logger.error("ASGI callable returned without sending the trailers it announced.")
                else:
                    logger.error("ASGI callable returned without completing the response.")
                self._fail()

    def _fail(self) -> None:
        if self.disconnected or (self.response_complete and not self.trailers_pending):
            return
        self.response_complete = True
        self._wake()
        self.stream.fail(self)
