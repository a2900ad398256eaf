"""WebSocket over real sockets, on both parsers (issue 3).

Well-behaved traffic uses the ``websockets`` sync client; protocol edge cases (invalid UTF-8,
unmasked frames, pings nobody answers, bytes right behind the handshake) use :class:`RawWS`,
a raw socket that writes frames by hand and reads the server's frames back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import wait_for

Scope = dict[str, Any]


# -- helpers ---------------------------------------------------------------------------------
def ws_connect(srv: Any, path: str = "/", **kwargs: Any) -> ClientConnection:
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("ping_interval", None)
    return connect(f"ws://{srv.host}:{srv.port}{path}", proxy=None, **kwargs)


class Recorder:
    """What the app saw, for assertions from the test thread."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []
        self.messages: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []

    def disconnect(self, timeout: float = 5.0) -> dict[str, Any]:
        return wait_for(lambda: next((m for m in self.messages if m["type"] == "websocket.disconnect"), None), timeout)


def echo_app(rec: Recorder | None = None, **accept: Any) -> Callable[..., Any]:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": b"http"})
            return
        if rec is not None:
            rec.scopes.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept", **accept})
        while True:
            message = await receive()
            if rec is not None:
                rec.messages.append(message)
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})

    return app


def handshake(path: str = "/", *, version: str = "13", key: str | None = None, extra: str = "", method: str = "GET",
              http: str = "1.1") -> bytes:
    key = key if key is not None else base64.b64encode(os.urandom(16)).decode()
    lines = [f"{method} {path} HTTP/{http}", "Host: testserver", "Upgrade: websocket", "Connection: Upgrade"]
    if key:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True) -> bytes:
    head = bytes([(0x80 if fin else 0) | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([bit | length])
    elif length < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawWS:
    """A raw client socket: HTTP head in, hand-made frames out, server frames back."""

    def __init__(self, srv: Any) -> None:
        self.sock = socket.create_connection((srv.host, srv.port), timeout=5)
        self.buf = b""

    def __enter__(self) -> RawWS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed with {self.buf!r}")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_head(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers and (Content-Length) body of an HTTP response."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed with {self.buf!r}")
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self._read(int(headers.get("content-length", 0)))
        return int(lines[0].split()[1]), headers, body

    def upgrade(self, path: str = "/", extra: bytes = b"") -> None:
        self.send(handshake(path) + extra)
        status, _, _ = self.read_head()
        assert status == 101

    def read_frame(self) -> tuple[int, bytes]:
        b1, b2 = self._read(2)
        assert not b2 & 0x80, "server frames are never masked"
        length = b2 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read(8))
        return b1 & 0x0F, self._read(length)

    def read_close(self) -> tuple[int, str]:
        """Skip to the server's close frame; its code and reason."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def at_eof(self, timeout: float = 3.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True


# -- echo, scope, messages ----------------------------------------------------------------------
def test_echo_text_and_binary(serve: Any) -> None:
    with serve(echo_app()) as srv, ws_connect(srv) as ws:
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send(b"\x00\x01\x02")
        assert ws.recv() == b"\x00\x01\x02"
        big = os.urandom(200_000)  # 64-bit length header both ways
        ws.send(big)
        assert ws.recv() == big
        ws.send("x" * 300)  # 16-bit length header
        assert ws.recv() == "x" * 300


def test_scope(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec), root_path="/api") as srv:
        with ws_connect(srv, "/chat%20room?a=1", subprotocols=["one", "two"]) as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.05)
    scope = rec.scopes[0]
    assert scope["type"] == "websocket"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["http_version"] == "1.1"
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/api/chat room"
    assert scope["raw_path"] == b"/api/chat%20room"
    assert scope["root_path"] == "/api"
    assert scope["query_string"] == b"a=1"
    assert scope["subprotocols"] == ["one", "two"]
    assert scope["client"][0] == "127.0.0.1" and scope["server"] == ("127.0.0.1", srv.port)
    assert (b"upgrade", b"websocket") in scope["headers"]
    assert scope["extensions"] == {"websocket.http.response": {}}
    assert scope["state"] == {}
    assert "method" not in scope


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, made here."""
    pytest.importorskip("cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("ws-tls")
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def test_wss(serve: Any, tls_files: tuple[str, str]) -> None:
    import ssl

    certfile, keyfile = tls_files
    rec = Recorder()
    context = ssl.create_default_context(cafile=certfile)
    with serve(echo_app(rec), ssl_certfile=certfile, ssl_keyfile=keyfile) as srv:
        with connect(f"wss://127.0.0.1:{srv.port}/secure", ssl=context, proxy=None, open_timeout=5) as ws:
            ws.send("over tls")
            assert ws.recv() == "over tls"
            big = os.urandom(300_000)
            ws.send(big)
            assert ws.recv() == big
        assert rec.disconnect()["code"] == 1000
    assert rec.scopes[0]["scheme"] == "wss"


def test_scheme_from_proxy_headers(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec)) as srv:
        with ws_connect(srv, additional_headers={"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"}):
            pass
        with ws_connect(srv):
            pass
    assert rec.scopes[0]["scheme"] == "wss"
    assert rec.scopes[0]["client"][0] == "10.1.2.3"
    assert rec.scopes[1]["scheme"] == "ws"


def test_fragmented_messages_are_assembled(serve: Any) -> None:
    with serve(echo_app()) as srv, ws_connect(srv, compression=None) as ws:
        ws.send(["hé", "llo", " wörld"])
        assert ws.recv() == "héllo wörld"
        ws.send([b"ab", b"cd", b"ef"])
        assert ws.recv() == b"abcdef"
    # A multi-byte character split across two frames is still valid UTF-8.
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        data = "é".encode()
        raw.send(frame(1, b"a" + data[:1], fin=False) + frame(0, data[1:] + b"b"))
        assert raw.read_frame() == (1, "aéb".encode())


def test_frames_split_anywhere_across_reads(serve: Any) -> None:
    """Frame headers, masks and payloads cut at arbitrary points (and 300 KiB spanning many
    reads) come out as the same messages: the server's reader joins what straddles reads."""
    big = os.urandom(300 * 1024)
    stream = (
        frame(1, b"first")
        + frame(2, b"")
        + frame(9, b"ping!")
        + frame(2, big[:70000], fin=False)
        + frame(9, b"")
        + frame(0, big[70000:])
        + frame(2, bytes(range(200)))
        + frame(1, "ünïcode".encode())
    )
    messages = [(1, b"first"), (2, b""), (2, big), (2, bytes(range(200))), (1, "ünïcode".encode())]
    pongs = [(10, b"ping!"), (10, b"")]  # answered at once, so ahead of some echoes
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sizes, pos = [1, 2, 3, 5, 7, 11, 4096, 65536], 0
        for i in range(len(stream)):
            if pos >= len(stream):
                break
            raw.send(stream[pos : pos + sizes[i % len(sizes)]])
            pos += sizes[i % len(sizes)]
        frames = [raw.read_frame() for _ in range(len(messages) + len(pongs))]
        assert [f for f in frames if f[0] != 10] == messages
        assert [f for f in frames if f[0] == 10] == pongs


def test_large_and_small_echoes_keep_their_order(serve: Any) -> None:
    """Echoes batched in one loop turn, large ones by reference and small ones joined, come
    back whole and in order."""
    sizes = [70000, 5, 200000, 126, 65536, 0, 300000, 65535]
    messages = [(2 if i % 2 else 1, bytes([97 + i]) * size) for i, size in enumerate(sizes)]
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        raw.send(b"".join(frame(opcode, payload) for opcode, payload in messages))
        assert [raw.read_frame() for _ in messages] == messages


def test_subprotocol_and_accept_headers(serve: Any) -> None:
    app = echo_app(subprotocol="two", headers=[(b"x-ws", b"yes")])
    with serve(app) as srv, ws_connect(srv, subprotocols=["one", "two"]) as ws:
        assert ws.subprotocol == "two"
        assert ws.response.headers["x-ws"] == "yes"
        assert ws.response.headers["server"] == "uvworker"
        ws.send("hi")
        assert ws.recv() == "hi"


def test_bytes_right_behind_the_handshake(serve: Any) -> None:
    """Frames sent in the same packet as the upgrade request are the first messages."""
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade(extra=frame(1, b"early") + frame(2, b"bird"))
        assert raw.read_frame() == (1, b"early")
        assert raw.read_frame() == (2, b"bird")


def test_frames_read_before_the_accept(serve: Any) -> None:
    """Frames that arrive in later reads while the app has not accepted yet are held (in the
    order read) and are the first messages once it accepts."""
    go = threading.Event()
    connected = threading.Event()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        connected.set()
        deadline = time.monotonic() + 10
        while not go.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await send({"type": "websocket.accept"})
        for _ in range(2):
            message = await receive()
            await send({"type": "websocket.send", "text": message["text"]})

    def held() -> int:
        return sum(len(part) for conn in srv.server.state.connections for part in getattr(conn, "_early", ()))

    first, second = frame(1, b"one"), frame(1, b"two")
    with serve(app) as srv, RawWS(srv) as raw:
        raw.send(handshake())
        assert connected.wait(5)
        raw.send(first)
        wait_for(lambda: held() == len(first))
        raw.send(second)
        wait_for(lambda: held() == len(first) + len(second))
        go.set()
        assert raw.read_head()[0] == 101
        assert raw.read_frame() == (1, b"one")
        assert raw.read_frame() == (1, b"two")


def test_upgrade_pipelined_behind_a_request(serve: Any) -> None:
    """The parser holds the upgrade request while the first response is written, then hands
    the connection over, frames included."""
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.send(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n" + handshake() + frame(1, b"queued"))
        assert raw.read_head()[::2] == (200, b"http")
        assert raw.read_head()[0] == 101
        assert raw.read_frame() == (1, b"queued")
        raw.send(frame(2, b"later"))
        assert raw.read_frame() == (2, b"later")


# -- closing ----------------------------------------------------------------------------------------
def test_server_close_with_code_and_reason(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4001, "reason": "bye now"})

    with serve(app) as srv, ws_connect(srv) as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye now")


def test_client_close_code_reaches_the_app(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec)) as srv:
        with ws_connect(srv) as ws:
            ws.send("one")
            assert ws.recv() == "one"
            ws.close(4002, "see you")
        assert rec.disconnect() == {"type": "websocket.disconnect", "code": 4002, "reason": "see you"}
        assert rec.messages[0] == {"type": "websocket.receive", "text": "one"}


def send_after_the_end(seen: list[Any]) -> Any:
    """An app that records the message ending the connection, then what a send() raises."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        seen.append(await receive())
        try:
            await send({"type": "websocket.send", "text": "too late"})
        except OSError as exc:
            seen.append(exc)

    return app


def test_lost_connection_is_1006_and_send_raises_oserror(serve: Any) -> None:
    seen: list[Any] = []
    app = send_after_the_end(seen)
    with serve(app) as srv:
        with RawWS(srv) as raw:
            raw.upgrade()
        wait_for(lambda: len(seen) == 2)
    assert seen[0]["type"] == "websocket.disconnect" and seen[0]["code"] == 1006
    assert isinstance(seen[1], OSError)


def test_app_returning_closes_with_1000(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "only this"})

    with serve(app) as srv, ws_connect(srv) as ws:
        assert ws.recv() == "only this"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000


def test_exception_after_accept_closes_with_1011(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()
        raise RuntimeError("boom")

    with serve(app) as srv, ws_connect(srv) as ws:
        ws.send("trigger")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1011


# -- refusing the handshake -----------------------------------------------------------------------------
def _status_of(srv: Any, **kwargs: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        ws_connect(srv, **kwargs)
    return info.value


def test_close_before_accept_is_403(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.close"})

    with serve(app) as srv:
        assert _status_of(srv).response.status_code == 403


def test_exception_before_accept_is_500(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    with serve(app) as srv:
        assert _status_of(srv).response.status_code == 500


def test_returning_without_a_handshake_message_is_500(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await receive()

    with serve(app) as srv:
        assert _status_of(srv).response.status_code == 500


def test_denial_response(serve: Any) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"www-authenticate", b"Bearer"), (b"content-type", b"text/plain")]})
        await send({"type": "websocket.http.response.body", "body": b"who ", "more_body": True})
        await send({"type": "websocket.http.response.body", "body": b"are you?"})

    with serve(app) as srv:
        response = _status_of(srv).response
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.body == b"who are you?"
        with RawWS(srv) as raw:  # framed (chunked here) and followed by a close
            raw.send(handshake())
            status, headers, _ = raw.read_head()
            assert status == 401 and headers["connection"] == "close"
            assert headers["transfer-encoding"] == "chunked"
            assert raw.at_eof()


def test_invalid_handshakes_are_answered_over_http(serve: Any) -> None:
    with serve(echo_app()) as srv:
        with RawWS(srv) as raw:
            raw.send(handshake(key=""))
            status, headers, body = raw.read_head()
            assert status == 400 and b"Sec-WebSocket-Key" in body and headers["connection"] == "close"
        with RawWS(srv) as raw:
            raw.send(handshake(key="not base64!"))
            assert raw.read_head()[0] == 400
        for version in ("8", ""):
            with RawWS(srv) as raw:
                raw.send(handshake(version=version))
                status, headers, _ = raw.read_head()
                assert status == 426 and headers["sec-websocket-version"] == "13"


def test_wrong_method_or_http10_is_plain_http(serve: Any) -> None:
    with serve(echo_app()) as srv:
        for request in (handshake(method="POST").replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
                        handshake(http="1.0")):
            with RawWS(srv) as raw:
                raw.send(request)
                status, _, body = raw.read_head()
                assert (status, body) == (200, b"http")


@pytest.mark.parametrize("setting,upgrade", [("none", "websocket"), ("auto", "h2c")])
def test_upgrade_not_taken_is_plain_http_and_the_connection_goes_on(serve: Any, setting: str, upgrade: str) -> None:
    """--ws none, or an upgrade to a protocol we do not speak: the app answers it as HTTP, and a
    request pipelined behind it is parsed and answered too."""
    rec = Recorder()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        rec.scopes.append(scope)
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    with serve(app, ws=setting) as srv, RawWS(srv) as raw:
        first = handshake("/first").replace(b"Upgrade: websocket", f"Upgrade: {upgrade}".encode())
        raw.send(first + b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.read_head()[::2] == (200, b"/first")
        assert raw.read_head()[::2] == (200, b"/second")
    assert [scope["type"] for scope in rec.scopes] == ["http", "http"]


# -- protocol errors, limits, keepalive ---------------------------------------------------------------------
def test_invalid_utf8_closes_with_1007(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec)) as srv:
        with RawWS(srv) as raw:
            raw.upgrade()
            raw.send(frame(1, b"ok\xff"))
            assert raw.read_close()[0] == 1007
            assert raw.at_eof()
        assert rec.disconnect()["code"] == 1007
        with RawWS(srv) as raw:  # fail fast: the bad first fragment is enough
            raw.upgrade()
            raw.send(frame(1, b"\xc3\x28", fin=False))
            assert raw.read_close()[0] == 1007


def test_close_between_fragments_is_a_clean_close(serve: Any) -> None:
    """RFC 6455 5.4: control frames may come between fragments (Autobahn 7.1.5)."""
    rec = Recorder()
    with serve(echo_app(rec)) as srv:
        with RawWS(srv) as raw:
            raw.upgrade()
            raw.send(frame(1, b"frag", fin=False) + frame(8, struct.pack("!H", 1000)) + frame(0, b"ment"))
            assert raw.read_close() == (1000, "")
            assert raw.at_eof()
        assert rec.disconnect() == {"type": "websocket.disconnect", "code": 1000, "reason": ""}
        assert [m["type"] for m in rec.messages] == ["websocket.disconnect"]


def test_send_after_a_protocol_failure_raises_oserror(serve: Any) -> None:
    seen: list[Any] = []
    app = send_after_the_end(seen)

    with serve(app) as srv:
        with RawWS(srv) as raw:
            raw.upgrade()
            raw.send(frame(0, b"continuation of nothing"))
            assert raw.read_close()[0] == 1002
        wait_for(lambda: len(seen) == 2)
    assert seen[0] == {"type": "websocket.disconnect", "code": 1002, "reason": "unexpected continuation frame"}
    assert isinstance(seen[1], OSError)


def test_protocol_error_closes_with_1002(serve: Any) -> None:
    with serve(echo_app()) as srv, RawWS(srv) as raw:
        raw.upgrade()
        raw.send(frame(1, b"unmasked", mask=False))
        assert raw.read_close()[0] == 1002


def test_message_too_big_closes_with_1009(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec), ws_max_size=1024) as srv:
        with ws_connect(srv) as ws:
            ws.send("a" * 1024)
            assert ws.recv() == "a" * 1024
            ws.send(b"b" * 1025)
            with pytest.raises(ConnectionClosed) as info:
                ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        assert rec.disconnect()["code"] == 1009
        with ws_connect(srv, compression=None) as ws:  # also when it comes in fragments
            with pytest.raises(ConnectionClosed) as info:  # the close may beat the last fragment's send
                ws.send([b"c" * 600, b"c" * 600])
                ws.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_ping_timeout_closes_with_1011(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec), ws_ping_interval=0.1, ws_ping_timeout=0.2) as srv, RawWS(srv) as raw:
        raw.upgrade()
        opcode, payload = raw.read_frame()
        assert opcode == 9  # a ping, which we do not answer
        started = time.monotonic()
        assert raw.read_close()[0] == 1011
        assert 0.1 < time.monotonic() - started < 2
        assert rec.disconnect()["code"] == 1011


def test_answered_pings_keep_the_connection(serve: Any) -> None:
    with serve(echo_app(), ws_ping_interval=0.05, ws_ping_timeout=0.1) as srv, ws_connect(srv) as ws:
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:  # the client answers pings while it waits in recv()
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.1)
        ws.send("still here")
        assert ws.recv() == "still here"


def test_permessage_deflate(serve: Any) -> None:
    with serve(echo_app()) as srv:
        with ws_connect(srv) as ws:
            assert "permessage-deflate" in ws.response.headers["sec-websocket-extensions"]
            assert ws.protocol.extensions
            text = "compress me " * 5000
            ws.send(text)
            assert ws.recv() == text
        # On the wire: the server's frame for 60 KB of repetitive text is small and has RSV1 set.
        with RawWS(srv) as raw:
            raw.send(handshake(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"))
            status, headers, _ = raw.read_head()
            assert status == 101 and headers["sec-websocket-extensions"].startswith("permessage-deflate")
            import zlib

            compressor = zlib.compressobj(wbits=-15)
            payload = compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH)
            raw.send(frame(1, payload[:-4]).replace(b"\x81", b"\xc1", 1))
            b1 = raw._read(1)[0]
            assert b1 & 0x40, "RSV1: the echo is compressed"
            raw.buf = bytes([b1]) + raw.buf
            opcode, data = raw.read_frame()
            assert opcode == 1 and len(data) < 1000
    with serve(echo_app(), ws_per_message_deflate=False) as srv, ws_connect(srv) as ws:
        assert "sec-websocket-extensions" not in ws.response.headers
        assert not ws.protocol.extensions


def test_backpressure_bounds_what_the_server_buffers(serve: Any) -> None:
    """An app that does not read: the server stops reading, so the client's sends block."""
    release = threading.Event()
    rec = Recorder()

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        import asyncio

        await receive()
        await send({"type": "websocket.accept"})
        while not release.is_set():
            await asyncio.sleep(0.01)
        while (message := await receive())["type"] != "websocket.disconnect":
            rec.messages.append(message)

    message = frame(2, b"m" * 65536)
    total = 256 * len(message)  # 16 MiB: far more than socket buffers + the queue hold
    with serve(app, ws_max_queue=4) as srv, RawWS(srv) as raw:
        raw.upgrade()
        raw.sock.settimeout(0.5)
        sent = 0
        try:
            while sent < total:
                sent += raw.sock.send(message)
        except TimeoutError:
            pass
        assert sent < total / 2, f"the server kept reading: {sent} bytes taken"
        conn = next(iter(srv.server.state.connections))
        assert len(conn._queue) <= 4 + 8  # max_queue plus at most one read's worth
        release.set()  # the app reads: everything sent so far arrives, in order
        wait_for(lambda: sum(len(m["bytes"]) for m in rec.messages) >= sent // len(message) * 65536)


# -- server-wide rules ----------------------------------------------------------------------------------
def test_limit_concurrency_applies(serve: Any) -> None:
    with serve(echo_app(), limit_concurrency=1) as srv:
        with ws_connect(srv) as ws:
            ws.send("in")
            assert ws.recv() == "in"
            assert _status_of(srv).response.status_code == 503
        wait_for(lambda: srv.server.active_requests == 0)
        with ws_connect(srv) as ws:  # the slot is free again
            ws.send("again")
            assert ws.recv() == "again"
        wait_for(lambda: srv.server.requests_served == 3)


def test_graceful_shutdown_closes_with_1012(serve: Any) -> None:
    rec = Recorder()
    with serve(echo_app(rec)) as srv, ws_connect(srv) as ws:
        ws.send("hi")
        assert ws.recv() == "hi"
        srv.server.should_exit = True
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1012
        assert rec.disconnect()["code"] == 1012
        srv.thread.join(5)
        assert not srv.thread.is_alive()


def test_client_that_stops_reading_is_dropped_and_the_apps_send_returns(serve: Any) -> None:
    """An app sending to a client that reads nothing (a dead peer, a frozen tab): its send()
    waits while the socket takes nothing; the keepalive ping gets no pong, the session fails
    with 1011, the app's send() raises at once (ClientDisconnected), and the connection, whose
    close frame cannot go out, is dropped at --timeout-send. Before, the send() waited and the
    connection stayed open for as long as the peer's socket did (TCP's own give-up, minutes),
    ping timeout or not."""
    outcome: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        try:
            while True:
                await send({"type": "websocket.send", "bytes": b"x" * (1 << 20)})
        except OSError as exc:  # ClientDisconnected
            outcome.append(type(exc).__name__)

    settings = {"ws_ping_interval": 0.2, "ws_ping_timeout": 0.3, "timeout_send": 1}
    with serve(app, **settings) as srv, RawWS(srv) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        raw.upgrade()  # and nothing read after the 101
        wait_for(lambda: outcome, timeout=10)
        assert outcome == ["ClientDisconnected"]
        wait_for(lambda: not srv.server.state.connections, timeout=10)
