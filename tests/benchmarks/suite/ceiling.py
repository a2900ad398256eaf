"""The ceiling: a bare uvloop protocol that answers every request with hello world, unparsed.

    python -m tests.benchmarks.suite.ceiling --port 8000

What no Python server on this loop can beat: one ``data_received`` per read, one fixed
response per request in it (a request is counted by its blank line, ``\\r\\n\\r\\n``, so wrk's
keep-alive GETs work and nothing is parsed), one ``transport.write``. The suite reports
uvworker as a share of it; the gap is what parsing, the ASGI cycle and the app cost.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import uvloop

RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 13\r\n"
            b"server: ceiling\r\n\r\nHello, world!")


class Hello(asyncio.Protocol):
    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        requests = data.count(b"\r\n\r\n")
        if requests:
            self.transport.write(RESPONSE * requests)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(Hello, sock=sock, backlog=2048)
    async with server:
        await stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
