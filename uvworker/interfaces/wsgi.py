"""WSGI (PEP 3333) applications behind the ASGI engine, streaming both ways in bounded memory.

The adapter is an ASGI application, so a WSGI app is served by the same request cycle as
everything else: framing, keep-alive, 100-continue, timeouts and limits exist once. Over
HTTP/1.1 the connection hands the adapter the cycle itself (``serve_cycle``): no ASGI task and
no ASGI messages until the response needs them (see ``Exchange``).

Rules this module keeps:

* The request body is never read ahead of the app. ``wsgi.input`` asks the event loop for the
  next piece only when the app reads, and the cycle stops reading the socket while the app
  does not consume (64 KiB high-water), so memory per request is bounded whatever the body
  size. A client that goes away mid-body makes ``read()`` raise ``ClientDisconnected`` (an
  ``OSError``), never a short read the app would take for the whole body.
* Response bytes handed to the event loop and not yet written are bounded (``PENDING_HIGH``):
  the app's thread waits while the socket is slower than the app. ``close()`` on the app's
  iterable is always called, in the app's thread, on success, error and disconnect alike.
* Headers are sent with the first non-empty body chunk (or at the end), so ``start_response``
  may be called again with ``exc_info`` until then (PEP 3333). The app's Content-Length is
  honoured: bytes beyond it are not sent and iteration stops.
* Bounded concurrency: ``threads`` apps run at once, ``queue`` more may wait for a thread;
  beyond that a request is answered 503 at once.
* environ: PATH_INFO is the percent-decoded raw path, one character per byte (latin-1), below
  SCRIPT_NAME (the root path); repeated headers are joined with "," (Cookie with "; "); header
  names containing "_" are dropped, so ``X_Forwarded_For`` cannot pose as ``X-Forwarded-For``.

Theory of operation. Each request gets an ``Exchange`` shared by two sides:

    app thread (worker pool)                     event loop (the request's ASGI task)
    ------------------------------------------   ------------------------------------------
    build environ, call the app, iterate    -->  ops deque: BODY(start?, data, more),
    wsgi.input.read() -> RECEIVE op, wait        RECEIVE, FINISH(error)
         on ``gate``                        <--  ``pump()`` sends/receives, then releases
                                                 ``gate`` (RECEIVE, or pending bytes drained)

The thread appends ops to the exchange's deque and the exchange to the loop's ``Completions``,
which schedules at most one wake-up of the loop at a time for all exchanges: a burst of small
responses (start + body + finish each) from the pool costs a single ``call_soon_threadsafe``,
and a small request a single job hand-off. Jobs are queued for the pool at the end of the
loop's turn, all at once. Served directly (HTTP/1.1), a response the thread hands over whole
is written by ``Completions.drain`` itself; the pump runs, in a task, only for the others.
If the pump ends early (the task is cancelled, or the engine
refuses what the app sent) the Exchange is *detached*: later ops are settled on arrival
(RECEIVE answered with a disconnect, pending bytes released), so the thread never waits for
a loop that no longer listens.

A thread cannot be stopped. When --timeout-request ends a request whose app is still running
(its task is cancelled with ``REQUEST_TIMEOUT``), the pump detaches and then waits for the
thread to finish, so the server sees the task alive and counts it (``ServerState.abandoned``);
meanwhile the pool no longer counts that thread and may start another in its place. Once the
thread finishes it rejoins the pool, and a pool over its size shrinks back as jobs end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import stat
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from uvworker import __version__
from uvworker.core.request import PERCENT
from uvworker.errors import REQUEST_TIMEOUT, ClientDisconnected
from uvworker.protocols.connection import drop_cancellation

if TYPE_CHECKING:
    from uvworker.protocols.cycle import RequestCycle

logger = logging.getLogger("uvworker.error")

DEFAULT_THREADS = 10
DEFAULT_QUEUE = 1000
PENDING_HIGH = 256 * 1024  # response bytes queued for the loop before the app's thread waits ...
PENDING_LOW = 64 * 1024  # ... until the loop has written the queue down to this
FILE_BLOCK = 256 * 1024  # wsgi.file_wrapper read size: fewer, larger hand-offs
IDLE_THREAD_TIMEOUT = 60.0  # an idle worker thread exits after this long; one is re-made on demand
GATE_POLL = 1.0  # a waiting thread checks this often whether the event loop is gone

# Op kinds (first item of an op tuple). RAISE is the loop's own: an error the fast path met,
# for the pump to raise in the request's task.
BODY, RECEIVE, FINISH, RAISE = 0, 1, 2, 3
RECEIVE_OP = (RECEIVE,)
END_OP = (BODY, None, b"", False, 0)  # end of a body whose headers were already sent
FINISH_OP = (FINISH, None)  # the app is done, without an error
DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}

Environ = dict[str, Any]
StartResponse = Callable[..., Callable[[bytes], None]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class WorkerPool:
    """Threads that run WSGI apps; started on demand, idle ones exit after a while.

    ``in_progress`` (jobs submitted and not yet finished) is only touched on the event loop,
    so the 503 decision costs no lock. The thread count is guarded by ``lock`` so that a thread
    timing out never strands a job just submitted.
    """

    def __init__(self, threads: int, queue_size: int) -> None:
        self.max_threads = threads
        self.limit = threads + queue_size
        self.in_progress = 0
        self.threads = 0
        self.jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.pending: list[Callable[[], None]] = []  # submitted in this loop turn, not queued yet
        self.lock = threading.Lock()

    def full(self) -> bool:
        return self.in_progress >= self.limit

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job (event loop only); start a thread if none may be free to take it."""
        self.in_progress += 1
        self.jobs.put(job)
        if self.threads < self.max_threads and self.threads < self.in_progress:
            self._grow()

    def submit_soon(self, loop: asyncio.AbstractEventLoop, job: Callable[[], None]) -> None:
        """Queue a job at the end of the loop's turn (event loop only), with the others of
        the turn. From an I/O callback a job would wake a thread while uvloop lets go of the
        GIL between callbacks: the thread takes it and the loop waits for it back (wsgi-hello:
        3.1 context switches per request instead of 0.17)."""
        self.in_progress += 1
        pending = self.pending
        pending.append(job)
        if len(pending) == 1:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        pending, self.pending = self.pending, []
        put = self.jobs.put
        for job in pending:
            put(job)
        while self.threads < self.max_threads and self.threads < self.in_progress:
            self._grow()

    def _grow(self) -> None:
        with self.lock:
            if self.threads < self.max_threads and self.threads < self.in_progress:
                self.threads += 1
                threading.Thread(target=self._work, name="uvworker-wsgi", daemon=True).start()

    def done(self) -> None:
        self.in_progress -= 1

    def set_aside(self) -> None:
        """A thread runs on after its request ended (event loop): it no longer counts, so
        another thread may start in its place."""
        self.in_progress -= 1
        with self.lock:
            self.threads -= 1
        self._grow()  # for the requests waiting in the queue

    def rejoin(self) -> None:
        """The thread set aside has finished its job (event loop) and takes jobs again."""
        with self.lock:
            self.threads += 1

    def stop(self) -> None:
        """Let the idle threads exit (server shutdown); busy ones exit after their job."""
        with self.lock:
            for _ in range(self.threads):
                self.jobs.put(None)

    def _work(self) -> None:
        _no_wakeup_preemption()
        jobs = self.jobs
        while True:
            try:
                job = jobs.get(True, IDLE_THREAD_TIMEOUT)  # by position: no keywords to parse
            except queue.Empty:
                with self.lock:
                    if jobs.empty():
                        self.threads -= 1
                        return
                continue
            if job is None:
                with self.lock:
                    self.threads -= 1
                return
            job()
            job = None  # the request's exchange is freed now, not when the next job comes
            if self.threads > self.max_threads:  # a thread set aside has rejoined: shrink back
                with self.lock:
                    if self.threads > self.max_threads:
                        self.threads -= 1
                        return


def _no_wakeup_preemption() -> None:
    """Make the calling pool thread SCHED_BATCH (Linux): same CPU share, but its wake-up does
    not preempt the running thread. The event loop wakes pool threads while it holds the GIL
    and goes on running; a woken thread that preempted it would only find the GIL taken and
    sleep again: two context switches for nothing (a third of them on the WSGI hello world)."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is not None:
        try:
            os.sched_setscheduler(0, batch, os.sched_param(0))
        except OSError:  # not allowed here (a seccomp profile): the default policy will do
            pass


class FileWrapper:
    """``wsgi.file_wrapper``: iterates a file in blocks; the server reads larger blocks itself."""

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration


class InputStream:
    """``wsgi.input``: the request body, pulled from the connection as the app reads it.

    ``read(n)`` returns n bytes unless the body ends first (like a buffered file), so apps
    that read ``CONTENT_LENGTH`` bytes in one call get them all. The piece received last is
    kept as is and sliced (one copy), or handed over whole when the app asks for all of it.
    """

    __slots__ = ("_exchange", "_chunk", "_pos", "_eof")

    def __init__(self, exchange: Exchange, eof: bool) -> None:
        self._exchange = exchange
        self._chunk = b""  # the piece being consumed, from offset _pos
        self._pos = 0
        self._eof = eof

    def _next(self) -> bool:
        """Replace the (consumed) current piece with the next one; False once the body ended."""
        while not self._eof:
            data, more = self._exchange.receive_body()
            if not more:
                self._eof = True
            if data:
                self._chunk, self._pos = data, 0
                return True
        self._chunk, self._pos = b"", 0
        return False

    def read(self, size: int | None = -1) -> bytes:
        chunk, pos = self._chunk, self._pos
        available = len(chunk) - pos
        if size is None or size < 0:
            size = -1
        elif available >= size:
            if pos == 0 and available == size:
                self._chunk = b""
                return chunk
            self._pos = pos + size
            return chunk[pos : pos + size]
        parts = [chunk[pos:]] if pos else [chunk]
        needed = size - available
        while (size < 0 or needed > 0) and self._next():
            chunk = self._chunk
            if size < 0 or len(chunk) <= needed:
                parts.append(chunk)
                needed -= len(chunk)
            else:
                parts.append(chunk[:needed])
                self._pos = needed
                return b"".join(parts)
        self._chunk, self._pos = b"", 0
        return b"".join(parts)

    def readline(self, size: int | None = -1) -> bytes:
        limit = -1 if size is None else size
        parts = []
        taken = 0
        while True:
            chunk, pos = self._chunk, self._pos
            end = len(chunk) if limit < 0 else min(len(chunk), pos + limit - taken)
            index = chunk.find(b"\n", pos, end)
            if index >= 0:
                end = index + 1
            parts.append(chunk[pos:end])
            taken += end - pos
            self._pos = end
            if index >= 0 or taken == limit or not (end == len(chunk) and self._next()):
                return b"".join(parts)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> InputStream:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


# ``wsgi.input`` of every request without a body: at its end, it has no state to keep.
_NO_BODY = InputStream(None, True)  # type: ignore[arg-type]

# -- environ ----------------------------------------------------------------------------------

# HTTP/2 as Gunicorn, mod_wsgi and nginx's $server_protocol name it (the scope's "2").
_SERVER_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2.0"}
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_KEYS: dict[bytes, str] = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}
_MAX_CACHED_KEYS = 1024


def _environ_key(name: bytes) -> str:
    """``HTTP_*`` key for a (lowercase) header name; "" for names with "_", which are dropped:
    ``X_Forwarded_For`` must not be able to pose as ``X-Forwarded-For`` (both HTTP_X_...)."""
    key = "" if b"_" in name else "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_KEYS) < _MAX_CACHED_KEYS:
        _KEYS[name] = key
    return key


def shared_environ(scope: dict[str, Any], base: Environ) -> tuple[Environ, bool]:
    """``base`` and the keys every request of one connection has alike (its client, its server,
    scheme and root path), and whether SERVER_NAME is among them (not on a Unix socket, where
    each request's Host header names the server)."""
    root_path: str = scope.get("root_path", "")
    client = scope.get("client")
    server = scope.get("server")
    environ = {
        **base,
        "SCRIPT_NAME": root_path.encode("utf-8").decode("latin-1") if root_path else "",
        "wsgi.url_scheme": scope.get("scheme", "http"),
    }
    if client:
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = "" if client[1] is None else str(client[1])
    named = bool(server and server[1] is not None)
    if named:
        environ["SERVER_NAME"] = server[0]  # type: ignore[index]
        environ["SERVER_PORT"] = str(server[1])  # type: ignore[index]
    return environ, named


def build_environ(scope: dict[str, Any], base: Environ,
                  shared: tuple[Environ, bool] | None = None) -> tuple[Environ, bool]:
    """The PEP 3333 environ for an ASGI http scope (without ``wsgi.input``), and whether the
    request has no body at all (so reading it needs no trip to the event loop). ``shared``:
    ``shared_environ(scope, base)``, kept for the connection's requests (hot path)."""
    if shared is None:
        shared = shared_environ(scope, base)
    # A copy of the shared part (a dict's copy clones its table) and a store per key: cheaper
    # than one dict display over it, which grows its table as it goes (hot path).
    environ = shared[0].copy()
    raw_path: bytes | None = scope.get("raw_path")
    if raw_path is None:
        raw_path = scope["path"].encode("utf-8")
    set_request_line(environ, scope["method"], raw_path, scope.get("root_path", ""), scope["query_string"])
    return environ, _set_head(environ, scope, shared[1])


def set_request_line(environ: Environ, method: str, raw_path: bytes, root_path: str, query: bytes) -> None:
    """The environ's keys from the request line, the ones a head's memo does not fix."""
    environ["REQUEST_METHOD"] = method
    if root_path:
        prefix = root_path.encode("utf-8")
        if raw_path.startswith(prefix):
            raw_path = raw_path[len(prefix) :]
    # PEP 3333: PATH_INFO holds the decoded bytes of the path, one character per byte.
    environ["PATH_INFO"] = (unquote_to_bytes(raw_path) if PERCENT in raw_path else raw_path).decode("latin-1")
    environ["QUERY_STRING"] = query.decode("latin-1")


def _set_head(environ: Environ, scope: dict[str, Any], named: bool) -> bool:
    """The environ's keys from the HTTP version and the header fields (and, on a Unix socket,
    where the server is not ``named``, from Host); whether the request has no body at all."""
    version = scope["http_version"]
    environ["SERVER_PROTOCOL"] = _SERVER_PROTOCOLS.get(version) or "HTTP/" + version
    keys = _KEYS
    for name, value in scope["headers"]:
        key = keys.get(name)
        if key is None:
            key = _environ_key(name)
        if not key:
            continue
        text = value.decode("latin-1")
        if key in environ:  # a repeated header: one value, comma-joined (cookies with "; ")
            text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
        environ[key] = text

    if not named:  # a Unix socket: the Host header is the best name there is
        host = environ.get("HTTP_HOST", "localhost")
        name, colon, port = host.rpartition(":") if not host.endswith("]") else ("", "", "")
        if colon and port.isdigit():
            environ["SERVER_NAME"], environ["SERVER_PORT"] = name, port
        else:
            environ["SERVER_NAME"], environ["SERVER_PORT"] = host, _DEFAULT_PORTS.get(environ["wsgi.url_scheme"], "80")
    length = environ.get("CONTENT_LENGTH")
    if length is None:
        # HTTP/1.x frames a body only by those two fields; HTTP/2 frames it by DATA frames, which
        # need no content-length, so there a head without one may still have a body to read.
        return "HTTP_TRANSFER_ENCODING" not in environ and version != "2"
    return not length.strip("0") and "HTTP_TRANSFER_ENCODING" not in environ


# -- one request --------------------------------------------------------------------------------


class Completions:
    """Exchanges with ops for the event loop, from any thread: one loop wake-up
    (``call_soon_threadsafe``) carries every exchange that has something to hand over until
    the loop drains them, so a burst of finished requests costs one wake-up, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ready: deque[Exchange] = deque()
        self.scheduled = False
        self._drain = self.drain

    def add(self, exchange: Exchange) -> None:
        """Any thread; raises RuntimeError once the loop is closed."""
        self.ready.append(exchange)
        if not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                self.scheduled = False
                raise

    def drain(self) -> None:
        """Event loop. ``scheduled`` is cleared before the deque is read, and each exchange's
        ``queued`` before its ops are: whatever is added meanwhile schedules another drain."""
        self.scheduled = False
        ready = self.ready
        while ready:
            exchange = ready.popleft()
            exchange.queued = False
            exchange.wake()


class RequestTask(asyncio.Future[None]):
    """What the connection knows as a directly served request's task (``cycle.task``): done
    once the request is over on the loop's side; ``cancel`` ends the exchange. Made as a
    plain future is (no ``__init__`` of its own: half the cost), then given its exchange."""

    __slots__ = ("exchange",)
    exchange: Exchange | None  # dropped once done: no cycle for the collector

    def cancel(self, msg: Any = None) -> bool:
        exchange = self.exchange
        return exchange.cancel(msg) if exchange is not None else False


class Exchange:
    """One WSGI request: the app's thread on one side, the request's ASGI task on the other.

    Direct (``cycle`` set, HTTP/1.1): there is no task until one is needed. A response that
    arrives whole (start, all of the body, finish: most of them) is written from
    ``Completions.drain``; anything else (a body read, a streamed response, an error, a
    paused transport) starts the pump in a task that runs it as the ASGI path does. The
    connection knows the request's task as a ``RequestTask``; its ``cancel`` is the exchange's:
    it detaches the exchange (or cancels the pump's task).

    Every attribute is a slot, set in ``__init__``: 3.11 reads a class default through an
    instance the generic way, and a slot is the cheapest attribute there is (hot path, both
    threads). The locks are made by the thread when it first needs one, before it hands over
    the op that makes the loop use it.
    """

    __slots__ = (
        "adapter", "completions", "scope", "receive", "send", "ops", "queued", "waiter", "gate", "mutex",
        "pending", "blocked", "receiving", "received", "disconnected", "detached", "running", "finished",
        "set_aside", "status", "headers", "headers_sent", "remaining", "complete", "cycle", "future",
        "pump_task",
    )

    def __init__(self, adapter: WSGIAdapter, completions: Completions, scope: dict[str, Any],
                 receive: Any = None, send: Any = None, cycle: RequestCycle | None = None) -> None:
        self.adapter = adapter
        self.completions = completions
        self.scope = scope
        self.receive = receive  # direct: the cycle's, once the pump starts
        self.send = send
        self.ops: deque[tuple[Any, ...]] = deque()
        self.queued = False  # in the Completions deque, not yet drained
        self.waiter: asyncio.Future[None] | None = None
        self.gate: threading.Lock | None = None  # held while nobody waits; released once per wait
        self.mutex: threading.Lock | None = None  # guards pending/blocked, shared by both sides
        self.pending = 0
        self.blocked = False
        self.receiving = False
        self.received: dict[str, Any] | None = None
        self.disconnected = False  # set on the loop; the thread stops producing when it sees it
        self.detached = False
        self.running = False  # set by the thread before it looks at ``disconnected``
        self.finished = False  # the loop has seen FINISH
        self.set_aside = False  # the pool no longer counts the thread (--timeout-request)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.headers_sent = False
        self.remaining: int | None = None  # Content-Length bytes still allowed
        self.complete = False
        self.cycle = cycle  # direct: the HTTP/1.1 cycle, served without a task until needed
        self.future: RequestTask | None = None  # direct: the cycle's task
        self.pump_task: asyncio.Task[None] | None = None

    # -- app thread ----------------------------------------------------------------------------
    def run(self) -> None:
        """Run the app and stream its response (in a pool thread; never raises)."""
        error: BaseException | None = None
        self.running = True
        if not self.disconnected:
            result: Any = None
            environ: Environ | None = None
            try:
                environ = self._environ()
                if self.adapter.keep_environ:  # the one the app sees: with the keys it sets
                    self.scope[ENVIRON_KEY] = environ
                result = self.adapter.app(environ, self.start_response)
                self._respond(result)
            except BaseException as exc:
                error = exc
            finally:
                close = None if type(result) is list else getattr(result, "close", None)
                if close is not None:
                    try:
                        close()
                    except BaseException as exc:
                        error = error or exc
                if environ is not None and self.adapter.keep_environ:
                    # The same without wsgi.input, which refers back to this exchange and its
                    # scope: no reference cycle outlives the request.
                    self.scope[ENVIRON_KEY] = {k: v for k, v in environ.items() if k != "wsgi.input"}
            if error is not None and not isinstance(error, Exception):
                # SystemExit, KeyboardInterrupt from an app must not stop the server's thread.
                wrapped = RuntimeError(f"The WSGI application raised {error!r}")
                wrapped.__cause__ = error
                error = wrapped
        self._push((FINISH, error) if error is not None else FINISH_OP)
        error = wrapped = None  # the error's traceback holds this frame: no cycle through it

    def _environ(self) -> Environ:
        """The request's environ. Direct (HTTP/1.1), from its connection's memo: the part its
        requests share, kept while the scope's client, server, scheme and root path stay the
        ones it was made for, by value (a trusted proxy's headers set them per request), and the
        keys of the last head, while the HTTP version and the header fields are the same
        (what a client sends request after request): a copy of that and the request line."""
        scope = self.scope
        cycle = self.cycle
        if cycle is None:
            environ, no_body = build_environ(scope, self.adapter.base_environ)
            environ["wsgi.input"] = _NO_BODY if no_body else InputStream(self, False)
            return environ
        stream = cycle.stream
        # An HTTP/1.1 scope has every key (core.request.ScopeTemplate's base): subscripts (hot path).
        client, server, scheme, root_path = scope["client"], scope["server"], scope["scheme"], scope["root_path"]
        version, headers = scope["http_version"], scope["headers"]
        held = stream.wsgi_environ
        if held is not None and held[0] == client and held[1] == server and held[2] == scheme and held[3] == root_path:
            if held[6] == headers and held[5] == version:
                environ = held[7].copy()
                set_request_line(environ, scope["method"], scope["raw_path"], root_path, scope["query_string"])
                if not held[8]:
                    environ["wsgi.input"] = InputStream(self, False)
                return environ
            shared = held[4]
        else:
            shared = shared_environ(scope, self.adapter.base_environ)
        environ, no_body = build_environ(scope, self.adapter.base_environ, shared)
        environ["wsgi.input"] = _NO_BODY  # the memo's, for a head without a body
        # A list of the same pairs (the scope's may be changed by the app, or by a hook).
        stream.wsgi_environ = (client, server, scheme, root_path, shared, version, headers.copy(), environ.copy(), no_body)
        if not no_body:
            environ["wsgi.input"] = InputStream(self, False)
        return environ

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no reference cycle through the traceback
        elif self.headers is not None:
            raise RuntimeError("start_response() was called a second time without exc_info")
        code = _STATUS_CODES.get(status) if type(status) is str else None
        if code is None:
            code = _status_code(status)
        adapter = self.adapter
        try:
            held = adapter.sent_headers
            if headers == held[0]:  # what the app sent last time (a list of the same pairs)
                encoded = held[1].copy()
                remaining = held[2]
            else:
                encoded = []
                remaining = None
                cache = _ENCODED_HEADERS
                known_all = type(headers) is list
                for header in headers:
                    try:
                        known = cache.get(header)
                    except TypeError:  # an unhashable item (a list): encoded below, or refused
                        known = None
                    if known is None:
                        known = _encode_header(*header)
                        known_all = False
                    pair, length = known
                    if length is not None:
                        remaining = length
                    encoded.append(pair)
                if known_all:  # every pair a remembered (str, str) tuple: an app cannot change them
                    adapter.sent_headers = (headers.copy(), encoded.copy(), remaining)
        except UnicodeEncodeError as exc:  # a ValueError: before the clause below
            raise ValueError(f"WSGI response headers must be latin-1 strings: {exc}") from None
        except (AttributeError, TypeError, ValueError):
            raise TypeError(f"Invalid WSGI response headers {headers!r}: expected a list of (str, str)") from None
        self.status = code
        self.headers = encoded
        self.remaining = remaining
        return self.write

    def write(self, data: bytes) -> None:
        """The ``write()`` callable of PEP 3333: send now (bounded queue), before returning."""
        if self.headers is None:
            raise RuntimeError("write() was called before start_response()")
        if self.disconnected:
            raise ClientDisconnected("the client has disconnected")
        if data:
            self._emit(data, True)

    def _respond(self, result: Iterable[bytes]) -> None:
        if type(result) is list or type(result) is tuple:
            # Already in memory: one body message, so small responses get a Content-Length. It
            # goes to the loop with FINISH (nothing is left to run in between: a list has no
            # close), so the loop gets the whole request in one hand-over.
            if len(result) > 1:
                self._emit(b"".join(result), False, True)
            else:
                self._emit(result[0] if result else b"", False, True)
            return
        if type(result) is FileWrapper:
            self._send_file(result)
            return
        for chunk in result:
            if chunk:
                self._emit(chunk, True)
                if self.complete or self.disconnected:
                    return
            elif type(chunk) is not bytes:
                _as_bytes(chunk)  # b"" is fine; "" or None is an error in the app
            elif self.disconnected:
                return
        if not self.complete:
            self._emit(b"", False)

    def _send_file(self, wrapper: FileWrapper) -> None:
        filelike = wrapper.filelike
        if self.remaining is None and self.headers is not None and not self.headers_sent:
            size = _remaining_file_size(filelike)
            if size is not None:  # a regular file: send it with a Content-Length, not chunked
                self.headers.append((b"content-length", b"%d" % size))
                self.remaining = size
        block = max(wrapper.blksize, FILE_BLOCK)
        read = filelike.read
        while not self.disconnected:
            data = read(block)
            if not data:
                break
            self._emit(data, True)
            if self.complete:
                return
        if not self.complete and not self.disconnected:
            self._emit(b"", False)

    def _emit(self, data: bytes, more: bool, with_finish: bool = False) -> None:
        """Queue body bytes for the loop; the first call also carries status and headers.
        ``with_finish``: the last bytes, handed over with the FINISH that ``run`` pushes next."""
        if type(data) is not bytes:
            data = _as_bytes(data)
        if self.complete or self.disconnected:
            return
        start = None
        if not self.headers_sent:
            if self.headers is None:
                raise RuntimeError("The WSGI application did not call start_response()")
            start = (self.status, self.headers)
            self.headers_sent = True
        remaining = self.remaining
        if remaining is not None:
            if len(data) >= remaining:  # PEP 3333: never send more than the Content-Length
                data = data[:remaining]
                more = False
            self.remaining = remaining - len(data)
        if not more:
            self.complete = True
            if start is None and not data:
                self._push(END_OP)
                return
        size = len(data) if more else 0
        wait = False
        if size:
            if self.mutex is None:
                self.mutex = threading.Lock()
                if self.gate is None:
                    self.gate = _closed_gate()
            with self.mutex:
                self.pending += size
                if self.pending > PENDING_HIGH:
                    self.blocked = wait = True
        if with_finish:
            self.ops.append((BODY, start, data, more, size))
            return
        self._push((BODY, start, data, more, size))
        if wait:
            self._wait()

    def receive_body(self) -> tuple[bytes, bool]:
        """The next piece of request body (for wsgi.input): (data, more)."""
        if self.disconnected:
            raise ClientDisconnected("the client disconnected before sending the whole request body")
        if self.gate is None:
            self.gate = _closed_gate()
        self._push(RECEIVE_OP)
        message = self.received if self._wait() else None
        self.received = None
        if message is None or message["type"] != "http.request":
            raise ClientDisconnected("the client disconnected before sending the whole request body")
        return message.get("body", b""), message.get("more_body", False)

    def _push(self, op: tuple[Any, ...]) -> None:
        self.ops.append(op)
        if not self.queued:
            self.queued = True
            try:
                self.completions.add(self)
            except RuntimeError:  # the event loop is closed: the server is gone
                self.disconnected = True

    def _wait(self) -> bool:
        """Wait for the loop to release the gate; False if the loop went away meanwhile."""
        gate = self.gate
        assert gate is not None
        while not gate.acquire(timeout=GATE_POLL):
            if self.completions.loop.is_closed():
                self.disconnected = True
                return False
        return True

    # -- event loop ----------------------------------------------------------------------------
    def wake(self) -> None:
        """The thread has handed over ops (called by Completions.drain)."""
        if self.detached:
            self._settle()
            return
        if self.cycle is not None and self.pump_task is None:
            self._serve()
            return
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _serve(self) -> None:
        """Direct, without a task: a whole response (start and the last body bytes in one op)
        is written here, then FINISH ends the request; any other op starts the pump."""
        cycle = self.cycle
        assert cycle is not None
        ops = self.ops
        op = ops[0]
        if op[0] == BODY and not op[3] and op[1] is not None and 200 <= op[1][0] <= 599 and not cycle.disconnected:
            ops.popleft()
            status, headers = op[1]
            stream = cycle.stream
            try:
                send_start = stream.send_start  # an attribute (see protocols.http CALLABLE_ATTRIBUTES)
                send_start(status, headers)
                cycle.status = status
                cycle.response_headers = headers
                cycle.response_started = cycle.response_complete = True
                stream.send_body(cycle, op[2], False)
            except Exception as exc:  # refused headers, a Content-Length the body does not match
                ops.appendleft((RAISE, exc))  # the pump raises it in the task, as send() would
                self._start_pump()
                return
            if not ops:
                return
            op = ops[0]
        if op is FINISH_OP and cycle.response_complete:
            ops.popleft()
            self.detached = self.finished = True
            self.adapter.pool.done()
            self._resolve()
            return
        self._start_pump()

    def _start_pump(self) -> None:
        """Leave the fast path: the pump carries out the ops from here on, in the request's task."""
        cycle = self.cycle
        assert cycle is not None
        self.receive, self.send = cycle.receive, cycle.send
        task = self.pump_task = self.completions.loop.create_task(cycle.run_asgi(self._pump_app))
        task.add_done_callback(self._pump_done)

    def _pump_app(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        return self.pump()

    def _pump_done(self, task: asyncio.Task[None]) -> None:
        if not self.detached:  # cancelled before its first step: the pump never ran
            self._detach()
        self._resolve()
        drop_cancellation(task)  # cancelled by the request's end: no cycle through its error

    def _resolve(self) -> None:
        future = self.future
        if future is not None and not future.done():
            future.exchange = None  # the cycle holds the future: no reference cycle is left behind
            future.set_result(None)

    def cancel(self, msg: Any = None) -> bool:
        """The connection ends the request (disconnect, --timeout-request, shutdown): cancel
        the pump's task, or detach; a thread still running after a request timeout is set
        aside, and the exchange is done once the thread finishes."""
        if self.pump_task is not None:
            return self.pump_task.cancel(msg)
        if self.future is None or self.future.done():
            return False
        self._detach()
        if msg == REQUEST_TIMEOUT and self.running and not self.finished:
            self.set_aside = True
            self.adapter.pool.set_aside()
        else:
            self._resolve()
        return True

    async def pump(self) -> None:
        """Carry out the thread's ops until it finishes (the request's ASGI task)."""
        ops = self.ops
        send = self.send
        try:
            while True:
                if not ops:
                    waiter = self.waiter = self.completions.loop.create_future()
                    await waiter
                    continue
                op = ops.popleft()
                kind = op[0]
                if kind == BODY:
                    _, start, data, more, size = op
                    if more and ops and ops[0] is END_OP:  # already known to be the last bytes
                        ops.popleft()
                        more = False
                    if not self.disconnected:
                        try:
                            if start is not None:
                                await send({"type": "http.response.start", "status": start[0], "headers": start[1]})
                            await send({"type": "http.response.body", "body": data, "more_body": more})
                        except ClientDisconnected:
                            self.disconnected = True
                    if size:
                        self._sent(size)
                elif kind == RAISE:
                    raise op[1]
                elif kind == RECEIVE:
                    self.receiving = True
                    self.received = DISCONNECT if self.disconnected else await self.receive()
                    self.receiving = False
                    self.gate.release()  # type: ignore[union-attr]
                else:
                    self.detached = self.finished = True
                    self.adapter.pool.done()
                    if op[1] is not None:
                        raise op[1]
                    return
        except BaseException as exc:
            op = None  # it may hold the error, whose traceback holds this frame: no cycle
            self._detach()
            if isinstance(exc, asyncio.CancelledError) and exc.args == (REQUEST_TIMEOUT,):
                if self.running and not self.finished:
                    await self._outlive()
            raise

    async def _outlive(self) -> None:
        """The request timed out but its thread runs on: keep this task until the thread ends
        (or the server cancels the task again, when it stops)."""
        self.set_aside = True
        self.adapter.pool.set_aside()
        waiter = self.waiter = self.completions.loop.create_future()
        await waiter

    def _sent(self, size: int) -> None:
        with self.mutex:  # type: ignore[union-attr]
            self.pending -= size
            if self.blocked and self.pending <= PENDING_LOW:
                self.blocked = False
                self.gate.release()  # type: ignore[union-attr]

    def _detach(self) -> None:
        """The pump is gone: unblock the thread now and settle whatever it sends later."""
        if self.detached:
            return
        self.detached = True
        self.disconnected = True
        if self.receiving:
            self.receiving = False
            self.received = DISCONNECT
            self.gate.release()  # type: ignore[union-attr]
        mutex = self.mutex
        if mutex is not None:  # else nothing is pending yet; what comes later is settled
            with mutex:
                if self.blocked:
                    self.blocked = False
                    self.gate.release()  # type: ignore[union-attr]
        self._settle()

    def _settle(self) -> None:
        ops = self.ops
        while ops:
            op = ops.popleft()
            kind = op[0]
            if kind == RECEIVE:
                self.received = DISCONNECT
                self.gate.release()  # type: ignore[union-attr]
            elif kind == FINISH:
                self.finished = True
                if self.set_aside:
                    self.adapter.pool.rejoin()
                    waiter, self.waiter = self.waiter, None
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                else:
                    self.adapter.pool.done()
                if self.pump_task is None:
                    self._resolve()  # direct, without a task: the request is over
                error = op[1]
                if error is not None and not isinstance(error, OSError):
                    logger.error("Exception in WSGI application", exc_info=error)
            elif kind == BODY and op[4]:  # dropped, but its bytes no longer hold the thread back
                self._sent(op[4])


_ENCODED_HEADERS: dict[tuple[str, str], tuple[tuple[bytes, bytes], int | None]] = {}
_MAX_ENCODED_HEADERS = 1024
_STATUS_CODES: dict[str, int] = {}  # WSGI status line -> its code, for the ones seen (bounded)


def _status_code(status: Any) -> int:
    """The code of a WSGI status ("200 OK"), remembered; ValueError for anything else."""
    if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit() or status[3:4] not in ("", " "):
        raise ValueError(f"Invalid WSGI status {status!r}: expected a string like '200 OK'")
    code = int(status[:3])
    if len(_STATUS_CODES) < _MAX_ENCODED_HEADERS and type(status) is str:
        _STATUS_CODES[status] = code
    return code


def _encode_header(name: str, value: str) -> tuple[tuple[bytes, bytes], int | None]:
    """A response header as bytes, and its value if it is a Content-Length; remembered (up to
    _MAX_ENCODED_HEADERS of them), as apps send the same few headers again and again."""
    pair = (name.encode("latin-1"), value.encode("latin-1"))
    length = int(value) if len(name) == 14 and name.lower() == "content-length" and value.strip().isdigit() else None
    known = (pair, length)
    if len(_ENCODED_HEADERS) < _MAX_ENCODED_HEADERS and type(name) is str and type(value) is str:
        _ENCODED_HEADERS[(name, value)] = known
    return known


def _closed_gate() -> threading.Lock:
    gate = threading.Lock()
    gate.acquire()
    return gate


def _as_bytes(data: Any) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"WSGI response body chunks must be bytes, not {type(data).__name__}")
    return bytes(data)


def _remaining_file_size(filelike: Any) -> int | None:
    try:
        info = os.fstat(filelike.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None
        return max(info.st_size - filelike.tell(), 0)
    except (AttributeError, OSError, ValueError, TypeError):
        return None


# The scope key under which an adapter with ``keep_environ`` leaves the request's environ.
ENVIRON_KEY = "uvworker.wsgi_environ"


class WSGIAdapter:
    """An ASGI 3 application serving the WSGI application ``app``."""

    keep_environ = False  # leave each request's environ in its scope (ENVIRON_KEY), once the app is done

    def __init__(self, app: WSGIApp, threads: int = DEFAULT_THREADS, queue_size: int = DEFAULT_QUEUE,
                 multiprocess: bool = True) -> None:
        self.app = app
        self.pool = WorkerPool(threads, queue_size)
        self.shed = 0  # requests answered 503 because the queue was full (read by the metrics)
        self.completions: Completions | None = None  # for the running loop, made on first use
        # The headers start_response was given last (a copy), their encoding and Content-Length:
        # an app sends the same few again and again (any thread: read and replaced whole).
        self.sent_headers: tuple[list[tuple[str, str]], list[tuple[bytes, bytes]], int | None] = ([], [], None)
        self.base_environ: Environ = {
            "SERVER_SOFTWARE": f"uvworker/{__version__}",
            "wsgi.version": (1, 0),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": threads > 1,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
        }

    def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        """The ASGI application call. Not itself a coroutine function: it returns the coroutine
        that serves the scope, so the request's task resumes the pump directly (hot path)."""
        kind = scope["type"]
        if kind == "http":
            if self.pool.full():
                self.shed += 1
                return _overloaded(send)
            completions = self.completions
            if completions is None or completions.loop is not asyncio.get_running_loop():
                completions = self.completions = Completions(asyncio.get_running_loop())
            exchange = Exchange(self, completions, scope, receive, send)
            self.pool.submit(exchange.run)
            return exchange.pump()
        if kind == "lifespan":
            return self._lifespan(receive, send)
        return _refuse(kind)

    def serve_cycle(self, cycle: RequestCycle) -> None:
        """Serve an HTTP/1.1 request without an ASGI task (``ServerState.direct``): the
        exchange is the cycle's task; it starts a real one only when the response needs it."""
        loop = cycle.stream.loop
        if self.pool.full():
            self.shed += 1
            cycle.task = loop.create_task(cycle.run_asgi(self._shed))
            return
        completions = self.completions
        if completions is None or completions.loop is not loop:
            completions = self.completions = Completions(loop)
        exchange = Exchange(self, completions, cycle.scope, None, None, cycle)
        task = cycle.task = exchange.future = RequestTask(loop=loop)
        task.exchange = exchange
        self.pool.submit_soon(loop, exchange.run)

    @staticmethod
    def _shed(scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        return _overloaded(send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.pool.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _refuse(kind: str) -> None:
    raise RuntimeError(f"A WSGI application cannot serve {kind!r} connections")


_BUSY_BODY = b"Service Unavailable: all WSGI threads are busy"


async def _overloaded(send: Any) -> None:
    await send({
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(_BUSY_BODY)),
            (b"connection", b"close"),
        ],
    })
    await send({"type": "http.response.body", "body": _BUSY_BODY})
