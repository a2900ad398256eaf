"""A small HTTP/2 client for black-box tests: the h2 package's client side on a blocking socket.

httpx and curl hide what the protocol tests need: frames sent out of order, floods, resets,
windows that are never opened, GOAWAY and its last stream id. ``H2Client`` keeps one socket
and the h2 client state; every read has a deadline (a test fails, it never hangs), and a
connection the server closes (FIN or reset) is recorded in ``closed``.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated, DataReceived, Event, InformationalResponseReceived, ResponseReceived, StreamEnded,
    StreamReset, TrailersReceived,
)
from h2.settings import SettingCodes


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    ended: bool = False
    reset: int | None = None  # the error code of a RST_STREAM from the server
    informational: list[int] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class H2Client:
    def __init__(
        self, host: str, port: int, *, tls: ssl.SSLContext | None = None, settings: dict[int, int] | None = None,
        auto_window: bool = True, timeout: float = 5.0, send_preface: bool = True,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.timeout = timeout
        self.auto_window = auto_window  # acknowledge received DATA at once (a client that reads)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if settings:  # a second SETTINGS frame, sent with the first (before any request)
            self.h2.update_settings(settings)
        self.responses: dict[int, H2Response] = {}
        self.events: list[Event] = []
        self.goaway: ConnectionTerminated | None = None
        self.closed = False
        if send_preface:  # else the first flush() sends it (connected now, talking later)
            self.flush()

    # -- sending ---------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def request(
        self, method: str = "GET", path: str = "/", headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None, end: bool = True, authority: str = "127.0.0.1",
    ) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        head = [(":method", method), (":path", path), (":scheme", "http"), (":authority", authority)]
        if method == "CONNECT":  # RFC 9113 §8.5: authority only
            head = [(":method", method), (":authority", authority)]
        head += headers or []
        encoded = [(k.encode(), v.encode()) for k, v in head]
        self.h2.send_headers(stream_id, encoded, end_stream=end and not body)
        if body:
            self.send_body(stream_id, body, end=end)
        self.responses[stream_id] = H2Response()
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        """As much of ``body`` as the windows allow now (the rest is dropped: tests size it)."""
        frame = self.h2.max_outbound_frame_size
        for start in range(0, len(body), frame):
            self.h2.send_data(stream_id, body[start : start + frame], end_stream=end and start + frame >= len(body))
        if not body and end:
            self.h2.end_stream(stream_id)
        self.flush()

    # -- receiving -------------------------------------------------------------------------------
    def read(self, until: Callable[[], Any], timeout: float | None = None) -> Any:
        """Read and handle events until ``until()`` is truthy (returned) or the server closes."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            value = until()
            if value or self.closed:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for the server")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            self.handle(self.h2.receive_data(data))
            self.flush()

    def handle(self, events: list[Event]) -> None:
        self.events.extend(events)
        for event in events:
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, ResponseReceived) and response is not None:
                response.status = int(dict(event.headers)[b":status"])
                response.headers = [(k, v) for k, v in event.headers if not k.startswith(b":")]
            elif isinstance(event, InformationalResponseReceived) and response is not None:
                response.informational.append(int(dict(event.headers)[b":status"]))
            elif isinstance(event, TrailersReceived) and response is not None:
                response.trailers = list(event.headers)
            elif isinstance(event, DataReceived) and response is not None:
                response.body += event.data
                if self.auto_window and event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, StreamEnded) and response is not None:
                response.ended = True
            elif isinstance(event, StreamReset) and response is not None:
                response.reset = event.error_code
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event

    def response(self, stream_id: int, timeout: float | None = None) -> H2Response:
        response = self.responses[stream_id]
        self.read(lambda: response.ended or response.reset is not None, timeout)
        return response

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Whether the server closed the connection (reading and handling what comes first)."""
        try:
            self.read(lambda: False, timeout)
        except AssertionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get(client: H2Client, path: str = "/", **kwargs: Any) -> H2Response:
    return client.response(client.request(path=path, **kwargs))


WINDOW = SettingCodes.INITIAL_WINDOW_SIZE
