"""--metrics-bind: /metrics, /livez and /readyz on a listener of their own.

Where it runs. With a supervisor, in the master's loop (a ``supervisor`` service: the master
stays single-threaded and never imports the app); the numbers are the fleet's, from the
workers' heartbeats (``uvworker.metrics`` fields), with the totals of every worker that has
exited kept by the policy, so counters never go backwards when a worker is recycled, crashes
or is killed. Without one, on the server's own event loop, from its own books. Both shapes
build the same ``Fleet`` and answer through ``respond``; only the socket handling differs
(a selector callback in the master, an asyncio protocol in the one process).

What it answers (HTTP/1.x, one request per connection, then the close):

    /metrics   Prometheus text format, or OpenMetrics when the Accept header asks for it
               (prometheus_client renders both), plus the serving process's own metrics
    /livez     200 while the loop that answers runs (the master's, or the one process's)
    /readyz    200 when at least one worker serves and the server is not draining (SIGTERM,
               also during --shutdown-delay), else 503
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import socket
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from supervisor.memory import unique_memory
from supervisor.metrics import fleet_counters
from uvworker import metrics as m
from uvworker.errors import ConfigError
from uvworker.settings import split_bind

if TYPE_CHECKING:
    from supervisor.master import Master
    from uvworker.config import Config
    from uvworker.protocols.connection import ServerState


class Served(Protocol):
    """What the one-process source reads of its ``uvworker.server.Server``."""

    state: ServerState | None
    started: bool

    @property
    def draining(self) -> bool: ...

logger = logging.getLogger("uvworker.error")

HEAD_LIMIT = 8192  # bytes of request head we read; more gets 431
EXCHANGE_TIMEOUT = 10.0  # a scraper that has not sent its request by then is cut off
MASTER_CONNECTIONS = 32  # open at once in the master; beyond, the oldest is closed
STATES = ("starting", "serving", "finishing", "retiring", "aborting")
RESTART_REASONS = ("max_requests", "max_lifetime", "max_memory", "crash", "hung", "reload", "scale")


@dataclass
class WorkerView:
    number: int
    pid: int | None
    state: str  # one of STATES
    fields: Mapping[str, str]  # its last heartbeat's (uvworker.metrics)


@dataclass
class Fleet:
    """What /metrics reports, from the master's records or the one process's books."""

    workers: list[WorkerView]
    counters: dict[str, list[float]]  # COUNTER_FIELDS, summed over every worker past and present
    restarts: Mapping[str, int] = field(default_factory=dict)


class Source:
    """Where the numbers come from: ``fleet()`` and ``ready()``."""

    def fleet(self) -> Fleet:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError


class MasterSource(Source):
    def __init__(self) -> None:
        self.master: Master | None = None

    def fleet(self) -> Fleet:
        policy = self.master.policy if self.master is not None else None
        if policy is None:
            return Fleet([], {})
        workers = [WorkerView(w.number, w.pid, w.state.value, w.fields) for w in policy.workers]
        counters = fleet_counters(policy.totals.counters, (w.fields for w in workers), m.COUNTER_FIELDS)
        return Fleet(workers, counters, policy.totals.restarts)

    def ready(self) -> bool:
        policy = self.master.policy if self.master is not None else None
        return policy is not None and policy.ready


class ServerSource(Source):
    """The one process: its own books are the only worker's."""

    def __init__(self, server: Served) -> None:
        self.server = server

    def fleet(self) -> Fleet:
        server, state = self.server, self.server.state
        if state is None or state.counters is None:
            return Fleet([WorkerView(1, os.getpid(), "starting", {})], {})
        fields = state.metrics_fields()
        kind = "retiring" if server.draining else "serving" if server.started else "starting"
        return Fleet([WorkerView(1, os.getpid(), kind, fields)], fleet_counters({}, [fields], m.COUNTER_FIELDS))

    def ready(self) -> bool:
        return self.server.started and not self.server.draining


# -- rendering --------------------------------------------------------------------------------


class _Collector:
    """A prometheus_client collector over ``source.fleet()``, read at each scrape."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        fleet = self.source.fleet()
        totals = fleet.counters

        def total(name: str, index: int = 0) -> float:
            values = totals.get(name, ())
            return values[index] if index < len(values) else 0.0

        codes = CounterMetricFamily("uvworker_requests", "Responses sent, by status class.", labels=["code"])
        for index in range(1, 6):
            codes.add_metric([f"{index}xx"], total(m.CODES, index))
        yield codes
        counts = [total(m.DURATIONS, i) for i in range(len(m.BUCKETS) + 1)]
        buckets, running = [], 0.0
        for bound, count in zip([*map(str, m.BUCKETS), "+Inf"], counts):
            running += count
            buckets.append((bound, running))
        yield HistogramMetricFamily(
            "uvworker_request_duration_seconds", "From the request head to the end of the response "
            "(WebSocket sessions excluded).", buckets=buckets, sum_value=total(m.DURATION_SUM),
        )
        for name, key, text in (
            ("uvworker_requests_shed", m.SHED, "Requests answered 503 by load shedding "
             "(--limit-concurrency, --wsgi-queue)."),
            ("uvworker_request_timeouts", m.TIMEOUTS, "Requests ended by --timeout-request."),
            ("uvworker_bytes_received", m.RECEIVED, "Bytes read from clients."),
            ("uvworker_bytes_sent", m.SENT, "Bytes written to clients."),
        ):
            yield CounterMetricFamily(name, text, value=total(key))
        for name, key, text in (
            ("uvworker_requests_in_flight", m.IN_FLIGHT, "Requests and WebSocket sessions in progress."),
            ("uvworker_connections_open", m.CONNECTIONS, "Client connections open."),
            ("uvworker_websockets_open", m.WEBSOCKETS, "WebSocket sessions open."),
        ):
            yield GaugeMetricFamily(name, text, value=sum(_number(w.fields, key) for w in fleet.workers))
        states = Counter(w.state for w in fleet.workers)
        workers = GaugeMetricFamily("uvworker_workers", "Worker processes, by state.", labels=["state"])
        for state in STATES:
            workers.add_metric([state], states[state])
        yield workers
        restarts = CounterMetricFamily(
            "uvworker_worker_restarts", "Workers replaced or lost, by reason.", labels=["reason"]
        )
        for reason in (*RESTART_REASONS, *sorted(set(fleet.restarts) - set(RESTART_REASONS))):
            restarts.add_metric([reason], fleet.restarts.get(reason, 0))
        yield restarts
        memory = GaugeMetricFamily(
            "uvworker_worker_memory_bytes", "Each worker's unique memory (USS).", labels=["worker", "pid"]
        )
        lag = GaugeMetricFamily(
            "uvworker_event_loop_lag_seconds", "How late each worker's event loop ran a timer at worst "
            "since its last report.", labels=["worker", "pid"],
        )
        for worker in sorted(fleet.workers, key=lambda w: (w.number, w.pid or 0)):
            if worker.pid is None:
                continue
            labels = [str(worker.number), str(worker.pid)]  # a slot's two workers while it is replaced
            uss = unique_memory(worker.pid)
            if uss is not None:
                memory.add_metric(labels, uss)
            if m.LOOP_LAG in worker.fields:
                lag.add_metric(labels, _number(worker.fields, m.LOOP_LAG))
        yield memory
        yield lag


def _number(fields: Mapping[str, str], key: str) -> float:
    try:
        return float(fields.get(key, 0))
    except ValueError:
        return 0.0


class Exporter:
    """Answers one request head (bytes) with one response (bytes)."""

    def __init__(self, source: Source) -> None:
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.source = source
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(source))  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)  # the serving process: the master, or the one
        PlatformCollector(registry=self.registry)

    def respond(self, head: bytes) -> bytes:
        if len(head) > HEAD_LIMIT:
            return _response(431, "Request Header Fields Too Large", b"request head too large\n")
        lines = head.split(b"\r\n")
        words = lines[0].split()
        if len(words) != 3 or not words[2].startswith(b"HTTP/1."):
            return _response(400, "Bad Request", b"bad request\n")
        method, target = words[0], words[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, "Method Not Allowed", b"GET or HEAD\n", extra=b"Allow: GET, HEAD\r\n")
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            from prometheus_client.exposition import choose_encoder

            accept = b""
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"accept":
                    accept = value.strip()
            encoder, content_type = choose_encoder(accept.decode("latin-1"))
            status, reason, body = 200, "OK", encoder(self.registry)
        elif path == b"/livez":
            status, reason, body, content_type = 200, "OK", b"ok\n", "text/plain; charset=utf-8"
        elif path == b"/readyz":
            ready = self.source.ready()
            status, reason = (200, "OK") if ready else (503, "Service Unavailable")
            body, content_type = (b"ready\n" if ready else b"not ready\n"), "text/plain; charset=utf-8"
        else:
            return _response(404, "Not Found", b"/metrics, /livez or /readyz\n")
        return _response(status, reason, b"" if method == b"HEAD" else body, content_type, len(body))


def _response(
    status: int, reason: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
    length: int | None = None, extra: bytes = b"",
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n"
    ).encode("latin-1")
    return head + extra + b"\r\n" + body


def _head_complete(data: bytes) -> bool:
    return b"\r\n\r\n" in data or len(data) > HEAD_LIMIT


# -- the listener -------------------------------------------------------------------------------


def listener(config: Config) -> socket.socket | None:
    """The --metrics-bind socket (None without the option); ConfigError (one line) when it
    cannot be had."""
    if config.metrics_bind is None:
        return None
    from supervisor.sockets import ListenError, describe, listen

    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError("--metrics-bind needs prometheus_client: pip install 'uvworker[metrics]'") from None
    host, port, uds = split_bind(config.metrics_bind)
    try:
        sock = listen(host, port, uds, None, 64, uds_mode=0o660)
    except ListenError as err:
        raise ConfigError(f"--metrics-bind: {err}") from err
    sock.setblocking(False)
    logger.info("Metrics and probes on %s: /metrics, /livez, /readyz", describe(sock))
    return sock


def close_listener(config: Config, sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.close()
    _, _, uds = split_bind(config.metrics_bind)
    if uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(uds)


@dataclass(eq=False)
class _Exchange:
    started: float
    data: bytes = b""
    out: bytes | None = None  # the response, once the head is in


class MasterEndpoint:
    """The listener as a ``supervisor`` service: served by the master's selector loop."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.source = MasterSource()
        self.exporter = Exporter(self.source)
        self.master: Master | None = None
        self.exchanges: dict[socket.socket, _Exchange] = {}

    def start(self, master: Master) -> None:
        self.master = self.source.master = master
        master.watch(self.sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self.exchanges):
            self._end(conn)

    def _accept(self, events: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:  # nothing after all, or out of descriptors: the next scrape retries
            return
        conn.setblocking(False)
        now = time.monotonic()
        for old, exchange in list(self.exchanges.items()):
            if now - exchange.started > EXCHANGE_TIMEOUT or len(self.exchanges) >= MASTER_CONNECTIONS:
                self._end(old)
        self.exchanges[conn] = _Exchange(now)
        assert self.master is not None
        self.master.watch(conn, selectors.EVENT_READ, lambda events: self._serve(conn))

    def _serve(self, conn: socket.socket) -> None:
        exchange = self.exchanges.get(conn)
        if exchange is None:
            return
        if exchange.out is None:
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._end(conn)
                return
            exchange.data += data
            if not _head_complete(exchange.data):
                return
            exchange.out = self.exporter.respond(exchange.data)
            assert self.master is not None
            self.master.watch(conn, selectors.EVENT_WRITE, lambda events: self._serve(conn))
        try:
            sent = conn.send(exchange.out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(exchange.out)
        exchange.out = exchange.out[sent:]
        if not exchange.out:
            self._end(conn)

    def _end(self, conn: socket.socket) -> None:
        self.exchanges.pop(conn, None)
        if self.master is not None:
            self.master.unwatch(conn)
        conn.close()


class _Protocol(asyncio.Protocol):
    """The listener in the one process: one request, one response, the close."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(EXCHANGE_TIMEOUT, transport.abort)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.data += data
        if _head_complete(self.data):
            self.transport.write(self.exporter.respond(self.data))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


async def serve_in_loop(sock: socket.socket, server: Served) -> asyncio.base_events.Server:
    """Start answering on ``sock`` on the running loop (the one-process shape)."""
    exporter = Exporter(ServerSource(server))
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Protocol(exporter), sock=sock)


