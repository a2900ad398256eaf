"""Shared fixtures: an in-process server on an ephemeral 127.0.0.1 port, for each parser.

``serve(app, **settings)`` starts ``Server(Config(app, **settings))`` in a thread with its own
event loop, on a socket bound here (port 0), and waits (with a deadline) until it accepts.
Tests then talk to ``srv.host``/``srv.port`` with raw sockets or httpx.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from uvworker.config import Config
from uvworker.server import Server

PARSERS = ["httptools", "h11"]


@dataclass
class RunningServer:
    server: Server
    config: Config
    host: str
    port: int
    thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@contextlib.contextmanager
def run_server(app: Any, **settings: Any) -> Iterator[RunningServer]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    settings.setdefault("lifespan", "off")
    settings.setdefault("access_log", False)
    config = Config(app, **settings)
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=10)
        if not server.started:
            raise RuntimeError("server failed to start")
        host, port = sock.getsockname()[:2]
        yield RunningServer(server, config, host, port, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        assert not thread.is_alive(), "server thread did not stop"


@pytest.fixture(params=PARSERS)
def http_parser(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def serve(http_parser: str) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """``with serve(app, **settings) as srv:`` — a running server using this test's parser."""

    def _serve(app: Any, **settings: Any) -> contextlib.AbstractContextManager[RunningServer]:
        settings.setdefault("http", http_parser)
        return run_server(app, **settings)

    return _serve
