"""Whole responses of eager starts written in bursts (uvworker.protocols.batch.Outbox): above
EAGER_ABOVE open connections a response the app's first step completes waits for BURST - 1
others, or for the turn's end, and nothing the connection writes or closes overtakes it; a
connection dropped meanwhile loses its own response only. A burst is one loop turn's reads,
which no socket makes happen at will: part of this is driven on the protocol, with the
instruction counter's transports; the rest runs over real sockets, where a client must see
nothing of it (each socket test checks that responses were held)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.benchmarks.instructions import Transport
from tests.conftest import PARSERS
from tests.http_client import Conn, build_request, parse_responses, respond
from tests.test_websocket import handshake
from uvworker.protocols import batch, http
from uvworker.protocols.batch import Outbox


class _Transport(Transport):
    """Keeps what is written, and the close, in order."""

    def __init__(self, log: list[tuple[int, bytes]], number: int, broken: bool = False) -> None:
        super().__init__()
        self.log, self.number = log, number
        self.written = b""
        self.closing = False
        self.broken = broken  # its write raises, as uvloop's does once it has closed under us

    def write(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.written += data
        self.log.append((self.number, data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.log.append((self.number, b"<close>"))

    def write_eof(self) -> None:
        self.log.append((self.number, b"<eof>"))

    def abort(self) -> None:
        self.log.append((self.number, b"<abort>"))


async def _path_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, body=scope["path"].encode())


def _drive(
    parser: str, count: int, turn: Callable[[list[Any]], None], app: Any = _path_app, log: list[tuple[int, bytes]] | None = None,
) -> list[tuple[int, bytes]]:
    """``count`` connections; ``turn(conns)`` runs as one loop callback; then a few turns more.
    Returns the transports' writes and closes, in order, as (connection, bytes)."""
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    log = [] if log is None else log

    async def main() -> None:
        config = Config(app, http=parser, access_log=False, lifespan="off")
        config.load()
        loop = asyncio.get_running_loop()
        state = make_state(config, loop, {})
        conns = [HTTPConnection(state) for _ in range(count)]
        for number, conn in enumerate(conns):
            conn.connection_made(_Transport(log, number))
        loop.call_soon(turn, conns)
        for _ in range(10):
            await asyncio.sleep(0)

    asyncio.run(main())
    return log


def _bodies(log: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The responses' bodies (a write may carry several) and the closes, in order."""
    return [
        (number, body)
        for number, data in log
        for body in ([data] if data.startswith(b"<") else [response.body for response in parse_responses(data)])
    ]


@pytest.mark.parametrize("parser", PARSERS)
def test_eager_starts_write_their_responses_in_bursts(parser: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """BURST responses go out together; the rest of the turn's at its end; in order. A
    connection whose response went out in a burst holds its next one again."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    count = batch.BURST + 3
    seen: list[int] = []

    def turn(conns: list[Any]) -> None:
        for number, conn in enumerate(conns):
            conn.data_received(build_request(target=f"/{number}"))
            seen.append(sum(1 for conn in conns if conn.transport.written))
        conns[0].data_received(build_request(target="/again"))
        seen.append(len(conns[0].transport.log))

    log = _drive(parser, count, turn)
    burst = batch.BURST
    assert seen == [0] * (burst - 1) + [burst] * 4 + [burst]  # nothing is written until the burst
    assert _bodies(log) == [(number, f"/{number}".encode()) for number in range(count)] + [(0, b"/again")]


@pytest.mark.parametrize("parser", PARSERS)
def test_a_plain_start_writes_its_response_at_once(parser: str) -> None:
    """At or below EAGER_ABOVE open connections nothing waits for a burst: an app's response
    is written by the time its send returns."""
    log: list[tuple[int, bytes]] = []
    written: list[int] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await _path_app(scope, receive, send)
        written.append(len(log))

    def turn(conns: list[Any]) -> None:
        for number, conn in enumerate(conns):
            conn.data_received(build_request(target=f"/{number}"))

    _drive(parser, 3, turn, app, log)
    assert written == [1, 2, 3]
    assert _bodies(log) == [(0, b"/0"), (1, b"/1"), (2, b"/2")]


@pytest.mark.parametrize("parser", PARSERS)
def test_what_a_connection_writes_or_closes_goes_after_its_held_response(
    parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held response, then in the same turn the same connection's next request (its answer)
    and one that closes: written in order, the close last."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)

    def turn(conns: list[Any]) -> None:
        conn = conns[0]
        conn.data_received(build_request(target="/1"))
        conn.data_received(build_request(target="/2"))
        conn.data_received(build_request(target="/3", headers=[("Connection", "close")]))

    log = _drive(parser, 1, turn)
    assert _bodies(log) == [(0, b"/1"), (0, b"/2"), (0, b"/3"), (0, b"<close>")]


def test_held_responses_reach_clients_over_sockets(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over real sockets, fewer requests than a burst: each is answered at its turn's end."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    with serve(_path_app) as srv:
        conns = [Conn.open(srv.host, srv.port) for _ in range(3)]
        try:
            for _ in range(3):
                for number, conn in enumerate(conns):
                    conn.send(build_request(target=f"/{number}"))
                for number, conn in enumerate(conns):
                    assert conn.read_response(timeout=5).body == f"/{number}".encode()
        finally:
            for conn in conns:
                conn.close()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """Eager starts for every connection; the responses the outbox was given."""
    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    seen: list[bytes] = []
    hold = Outbox.hold

    def watched(self: Outbox, conn: Any, data: bytes) -> None:
        seen.append(data)
        hold(self, conn, data)

    monkeypatch.setattr(Outbox, "hold", watched)
    yield seen


async def echo_path(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"st", b"re", b"am"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await respond(send, body=scope["path"].encode())


def test_many_connections_get_their_own_responses_whole(serve: Any, held: list[bytes]) -> None:
    """More connections than BURST send at once: each gets its own answer, and the last ones
    of a turn are not left waiting for others that do not come."""
    count = batch.BURST * 2 + 5
    with serve(echo_path) as srv:
        conns = [Conn.open(srv.host, srv.port) for _ in range(count)]
        try:
            for n, conn in enumerate(conns):
                conn.send(build_request(target=f"/{n}"))
            for n, conn in enumerate(conns):
                assert conn.read_response(timeout=5).body == f"/{n}".encode()
            # One at a time too: a lone response goes out at the end of its turn.
            for n, conn in enumerate(conns[:3]):
                conn.send(build_request(target=f"/again{n}"))
                assert conn.read_response(timeout=5).body == f"/again{n}".encode()
        finally:
            for conn in conns:
                conn.close()
    assert len(held) >= count + 3


def test_pipelined_responses_stay_in_order(serve: Any, held: list[bytes]) -> None:
    """A held response, then the same connection's next ones (streamed, whole): in order."""
    with serve(echo_path) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(b"".join(build_request(target=path) for path in ("/0", "/stream", "/2", "/stream", "/4")))
        data = conn.read_until(b"/4", deadline=time.monotonic() + 5)
        conn.assert_open()
    assert [r.body for r in parse_responses(data)] == [b"/0", b"stream", b"/2", b"stream", b"/4"]
    assert held


def test_a_held_response_goes_out_before_the_400_of_a_bad_request_behind_it(serve: Any, held: list[bytes]) -> None:
    """The bad request is refused in the same callback, while the first answer is held."""
    with serve(echo_path) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/good") + b"NOT A REQUEST\r\n\r\n")
        data = conn.read_until_close(timeout=5)
    assert [(r.status, r.body) for r in parse_responses(data)][0] == (200, b"/good")
    assert [r.status for r in parse_responses(data)][1] == 400
    assert held


def test_a_held_response_goes_out_before_its_connection_closes(serve: Any, held: list[bytes]) -> None:
    with serve(echo_path) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/last", headers=[("Connection", "close")]))
        data = conn.read_until_close(timeout=5)
    (response,) = parse_responses(data)
    assert response.status == 200 and response.body == b"/last"
    assert held


def test_a_held_response_goes_out_before_the_101_behind_it(serve: Any, held: list[bytes]) -> None:
    """A request and a WebSocket handshake read together: the first answer, then the 101."""
    with serve(echo_path) as srv, Conn.open(srv.host, srv.port) as conn:
        conn.send(build_request(target="/first") + handshake("/ws"))
        first = conn.read_response(timeout=5)
        switching = conn.read_until(b"\r\n\r\n", deadline=time.monotonic() + 5)
    assert first.status == 200 and first.body == b"/first"
    assert switching.startswith(b"HTTP/1.1 101 ")
    assert held


@pytest.mark.parametrize("parser", PARSERS)
def test_a_dropped_or_broken_connection_loses_its_own_held_response_only(
    parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One turn's reads (driven), in bursts of BURST and the rest at the turn's end: a
    connection dropped while its response is held, and one whose transport has closed under
    it (its write raises), lose theirs; the others' are written whole."""
    from uvworker.config import Config
    from uvworker.protocols.http import HTTPConnection
    from uvworker.server import make_state

    monkeypatch.setattr(http, "EAGER_ABOVE", 0)
    count = batch.BURST * 2 + 3

    async def main() -> tuple[list[int], list[int], list[bytes]]:
        config = Config(echo_path, http=parser, access_log=False, lifespan="off")
        config.load()
        loop = asyncio.get_running_loop()
        state = make_state(config, loop, {})
        log: list[tuple[int, bytes]] = []
        transports = [_Transport(log, n, broken=n == 1) for n in range(count)]
        conns = [HTTPConnection(state) for _ in transports]
        for conn, transport in zip(conns, transports):
            conn.connection_made(transport)
        during: list[int] = []

        def one_turn() -> None:
            for n, conn in enumerate(conns):
                conn.data_received(build_request(target=f"/{n}"))
                during.append(sum(1 for transport in transports if transport.written))
                if n == 0:
                    conn.drop()  # its response is held: it goes nowhere

        loop.call_soon(one_turn)
        await asyncio.sleep(0)  # one_turn runs, which schedules the outbox's end of turn
        await asyncio.sleep(0)  # which has run now
        after = [n for n, transport in enumerate(transports) if transport.written]
        return during, after, [transport.written for transport in transports]

    during, after, written = asyncio.run(main())
    # The first burst (connections 0 to BURST - 1: 0 dropped, 1 broken) is written with the
    # BURST-th response, the second with the 2 * BURST-th; the last three at the turn's end.
    assert during[batch.BURST - 2] == 0 and during[batch.BURST - 1] == batch.BURST - 2
    assert during[2 * batch.BURST - 1] == 2 * batch.BURST - 2 and during[-1] == 2 * batch.BURST - 2
    assert after == list(range(2, count))
    for n in after:
        (response,) = parse_responses(written[n])
        assert response.body == f"/{n}".encode()


