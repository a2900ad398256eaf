"""Whole responses of eager starts written in bursts (Connection.hold): above EAGER_ABOVE open
connections a response the app's first step completes waits for BURST - 1 others, or for the
turn's end, and nothing the connection writes or closes overtakes it. A burst is one loop
turn's reads, which no socket makes happen at will: most of this is driven on the protocol,
with the instruction counter's transports; one test runs it over real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.benchmarks.instructions import Transport
from tests.conftest import PARSERS
from tests.http_client import Conn, build_request, parse_responses, respond
from uvworker.protocols import connection, http


class _Transport(Transport):
    """Keeps what is written, and the close, in order."""

    def __init__(self, log: list[tuple[int, bytes]], number: int) -> None:
        super().__init__()
        self.log, self.number = log, number
        self.written = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data
        self.log.append((self.number, data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.log.append((self.number, b"<close>"))

    def write_eof(self) -> None:
        self.log.append((self.number, b"<eof>"))


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
    count = connection.BURST + 3
    seen: list[int] = []

    def turn(conns: list[Any]) -> None:
        for number, conn in enumerate(conns):
            conn.data_received(build_request(target=f"/{number}"))
            seen.append(sum(1 for conn in conns if conn.transport.written))
        conns[0].data_received(build_request(target="/again"))
        seen.append(len(conns[0].transport.log))

    log = _drive(parser, count, turn)
    burst = connection.BURST
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
