"""Access-log atoms, JSON lines, logging configuration and reopening; then the access log and
proxy handling through a running server."""

from __future__ import annotations

import json
import logging
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from uvworker.logging import AccessLog, atoms, configure_logging, reopen_files

SCOPE: dict[str, Any] = {
    "type": "http",
    "http_version": "1.1",
    "method": "POST",
    "path": "/a b",
    "raw_path": b"/a%20b",
    "query_string": b"x=1&y=2",
    "client": ("192.0.2.7", 51000),
    "headers": [
        (b"host", b"example.com"),
        (b"user-agent", b"curl/8.0"),
        (b"referer", b"https://example.com/"),
        (b"authorization", b"Basic YWxpY2U6c2VjcmV0"),  # alice:secret
        (b"x-request-id", b"r-1"),
        (b"x-request-id", b"r-2"),
    ],
}
RESPONSE_HEADERS = [(b"Content-Type", b"text/plain"), (b"x-cache", b"HIT")]


def render(fmt: str, scope: dict[str, Any] = SCOPE, body_bytes: int = 1234, **kw: Any) -> str:
    args = {"status": 201, "response_headers": RESPONSE_HEADERS, "body_bytes": body_bytes,
            "start_time": 1_700_000_000.25, "duration": 2.029} | kw
    return AccessLog(fmt).render(scope, **args)


@pytest.mark.parametrize(
    "atom, expected",
    [
        ("h", "192.0.2.7"),
        ("l", "-"),
        ("u", "alice"),
        ("r", "POST /a%20b?x=1&y=2 HTTP/1.1"),
        ("m", "POST"),
        ("U", "/a b"),
        ("q", "x=1&y=2"),
        ("H", "HTTP/1.1"),
        ("s", "201"),
        ("B", "1234"),
        ("b", "1234"),
        ("f", "https://example.com/"),
        ("a", "curl/8.0"),
        ("T", "2"),
        ("D", "2029000"),
        ("M", "2029"),  # not 2028: float truncation must not lose a millisecond
        ("L", "2.029000"),
        ("{X-Request-Id}i", "r-1"),  # case-insensitive; the first of repeated headers
        ("{content-type}o", "text/plain"),
        ("{X-CACHE}o", "HIT"),
        ("{accept}i", "-"),
        ("{etag}o", "-"),
        ("nonsense", "-"),
    ],
)
def test_atom(atom: str, expected: str) -> None:
    assert render(f"%({atom})s") == expected


def test_time_atom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert render("%(t)s", start_time=1_600_000_000.9) == "[13/Sep/2020:12:26:40 +0000]"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_pid_and_environ_atoms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPLOY_COLOR", "blue")
    assert render("%(p)s %({DEPLOY_COLOR}e)s %({NO_SUCH_VAR_X}e)s").split(" ")[1:] == ["blue", "-"]
    assert render("%(p)s").startswith("<") and render("%(p)s")[1:-1].isdigit()


def test_missing_values_are_dashes() -> None:
    bare = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": None}
    assert render("%(h)s %(u)s %(f)s %(a)s %(b)s", bare, body_bytes=0) == "- - - - -"
    assert render("%(B)s %(r)s", bare, body_bytes=0) == "0 GET / HTTP/1.1"


@pytest.mark.parametrize("auth", [b"Bearer abc", b"Basic !!!", b"Basic Onh4"])  # ":xx"
def test_user_atom_without_basic_user(auth: bytes) -> None:
    scope = SCOPE | {"headers": [(b"authorization", auth)]}
    assert render("%(u)s", scope) == "-"


def test_quotes_in_values_are_escaped() -> None:
    scope = SCOPE | {"headers": [(b"user-agent", b'evil" 200 "x')]}
    assert render('"%(a)s"', scope) == '"evil\\" 200 \\"x"'


def test_default_format() -> None:
    line = AccessLog().render(SCOPE, 200, [], 5, time.time(), 0.0015)
    assert line.startswith('192.0.2.7 - [')
    assert line.endswith('] "POST /a%20b?x=1&y=2 HTTP/1.1" 200 5 0.001500s')


def test_json_format() -> None:
    record = json.loads(render("json"))
    assert record.pop("time").startswith(time.strftime("%Y-%m-%dT", time.localtime(1_700_000_000)))
    assert record == {
        "client": "192.0.2.7", "method": "POST", "path": "/a b", "query": "x=1&y=2",
        "protocol": "HTTP/1.1", "status": 201, "bytes": 1234, "duration_ms": 2029.0,
        "referer": "https://example.com/", "user_agent": "curl/8.0",
    }
    bare = {"type": "http", "method": "GET", "path": "/", "headers": [], "client": None}
    record = json.loads(render("json", bare))
    assert (record["client"], record["referer"], record["user_agent"]) == (None, None, None)


@pytest.mark.parametrize("fmt", ["%(h)", "100%", "%(s)d %(h)d"])
def test_invalid_format(fmt: str) -> None:
    with pytest.raises(ValueError, match="The access log format .* is invalid"):
        AccessLog(fmt)


def test_atoms_for_gunicorn() -> None:
    values = atoms(SCOPE, 404, RESPONSE_HEADERS, 0, 1_700_000_000.0, 0.5)
    assert values["s"] == 404 and values["b"] == "-" and values["B"] == 0
    assert values["{x-request-id}i"] == "r-1" and values["{content-type}o"] == "text/plain"
    assert set("hlutrmUqHsBbfaTDMLp") <= values.keys()


def test_log_writes_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "uvworker.access")
    AccessLog("%(m)s %(s)s").log(SCOPE, 204, [], 0, time.time(), 0.01)
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("uvworker.access", logging.INFO, "POST 204")
    ]


def test_log_does_nothing_when_disabled(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "uvworker.access")
    access = AccessLog()
    monkeypatch.setattr(access, "render", lambda *a: pytest.fail("rendered while disabled"))
    access.log(SCOPE, 200, [], 0, time.time(), 0.01)
    assert caplog.records == []


# --- configure_logging / reopen_files ----------------------------------------------------

OUR_LOGGERS = ("uvworker.error", "uvworker.access", "")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in OUR_LOGGERS]
    saved = [(lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in loggers]
    yield
    for logger, (handlers, level, propagate, disabled) in zip(loggers, saved):
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:] = handlers
        logger.level, logger.propagate, logger.disabled = level, propagate, disabled


@pytest.mark.usefixtures("restore_logging")
def test_default_logging(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning")
    logging.getLogger("uvworker.error").warning("disk almost full")
    logging.getLogger("uvworker.error").info("not shown")
    AccessLog("%(s)s %(U)s").log(SCOPE, 200, [], 0, time.time(), 0.0)  # below warning
    configure_logging()
    AccessLog("%(s)s %(U)s").log(SCOPE, 200, [], 0, time.time(), 0.0)
    out, err = capsys.readouterr()
    assert out == "200 /a b\n"
    assert err.endswith("[WARNING] disk almost full\n") and err.count("\n") == 1


@pytest.mark.usefixtures("restore_logging")
def test_log_config_files(tmp_path: Path) -> None:
    def config_for(target: Path) -> dict[str, Any]:
        return {
            "version": 1,
            "handlers": {"f": {"class": "logging.FileHandler", "filename": str(target)}},
            "loggers": {"uvworker.error": {"handlers": ["f"], "level": "DEBUG"}},
        }

    configure_logging(None, config_for(tmp_path / "dict.log"))
    logging.getLogger("uvworker.error").debug("from dict")
    (tmp_path / "c.json").write_text(json.dumps(config_for(tmp_path / "json.log")))
    configure_logging(None, str(tmp_path / "c.json"))
    logging.getLogger("uvworker.error").debug("from json")
    (tmp_path / "c.ini").write_text(
        "[loggers]\nkeys=root,error\n[handlers]\nkeys=f\n[formatters]\nkeys=\n"
        "[logger_root]\nhandlers=\n[logger_error]\nqualname=uvworker.error\nlevel=DEBUG\n"
        f"handlers=f\n[handler_f]\nclass=FileHandler\nargs=({str(tmp_path / 'ini.log')!r},)\n"
    )
    configure_logging(None, str(tmp_path / "c.ini"))
    logging.getLogger("uvworker.error").debug("from ini")
    for name in ("dict", "json", "ini"):
        assert (tmp_path / f"{name}.log").read_text() == f"from {name}\n"


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    "level, config",
    [
        ("info", "missing.ini"),
        ("info", "missing.json"),
        ("info", {"version": 99}),
        ("loud", None),
    ],
)
def test_bad_log_config(tmp_path: Path, level: str, config: Any) -> None:
    if isinstance(config, str):
        config = str(tmp_path / config)
    with pytest.raises(ValueError) as info:
        configure_logging(level, config)
    assert str(info.value).endswith(".") and "\n" not in str(info.value)


@pytest.mark.usefixtures("restore_logging")
def test_yaml_log_config(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "version: 1\nhandlers:\n  f: {class: logging.FileHandler, filename: '%s'}\n"
        "loggers:\n  uvworker.error: {handlers: [f], level: DEBUG}\n" % (tmp_path / "yaml.log")
    )
    configure_logging(None, str(tmp_path / "c.yaml"))
    logging.getLogger("uvworker.error").debug("from yaml")
    assert (tmp_path / "yaml.log").read_text() == "from yaml\n"


@pytest.mark.usefixtures("restore_logging")
def test_log_files_with_a_log_config_fill_in_where_it_is_silent(tmp_path: Path) -> None:
    """The user's config wins for the loggers it configures; a log file option still serves a
    uvworker logger it leaves alone (as Gunicorn combines them), and says when it is unused."""
    own = tmp_path / "own.log"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"own": {"class": "logging.FileHandler", "filename": str(own)}},
        "loggers": {"uvworker.error": {"handlers": ["own"], "level": "INFO"}},
    }
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    configure_logging("info", config, access_logfile=str(access), error_logfile=str(error))
    AccessLog("%(s)s %(U)s").log(SCOPE, 200, [], 0, time.time(), 0.0)
    logging.getLogger("uvworker.error").info("server message")
    assert access.read_text() == "200 /a b\n"  # uvworker.access: not in the config, so the option serves it
    assert own.read_text().splitlines() == [
        f"--error-logfile {error} is not used: the log config configures the uvworker.error logger.",
        "server message",
    ]
    assert error.read_text() == ""


@pytest.mark.usefixtures("restore_logging")
def test_log_files_without_a_log_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    configure_logging("info", access_logfile=str(access), error_logfile=str(error))
    AccessLog("%(s)s %(U)s").log(SCOPE, 200, [], 0, time.time(), 0.0)
    logging.getLogger("uvworker.error").warning("disk almost full")
    assert access.read_text() == "200 /a b\n"
    assert error.read_text().endswith("[WARNING] disk almost full\n")
    assert capsys.readouterr() == ("", "")


@pytest.mark.usefixtures("restore_logging")
def test_reopen_files_after_a_move_in_the_middle_of_records(tmp_path: Path) -> None:
    """A reopen between a record's write and its flush (a signal handler can land there) keeps
    the record whole in the old file; the file object stays the same."""
    path = tmp_path / "error.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("uvworker.error")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stream = handler.stream
    stream.write("half a record")  # buffered, not yet flushed
    path.rename(tmp_path / "error.log.1")
    reopen_files()
    logger.info("after")
    assert handler.stream is stream
    assert (tmp_path / "error.log.1").read_text() == "half a record"
    assert path.read_text() == "after\n"


@pytest.mark.usefixtures("restore_logging")
def test_reopen_files(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    handler = logging.FileHandler(path)
    logging.getLogger("uvworker.access").addHandler(handler)
    logger = logging.getLogger("uvworker.access")
    logger.setLevel(logging.INFO)
    logger.info("before")
    path.rename(tmp_path / "access.log.1")  # what logrotate does
    reopen_files()
    logger.info("after")
    assert (tmp_path / "access.log.1").read_text() == "before\n"
    assert path.read_text() == "after\n"


# --- through a running server ------------------------------------------------------------


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = json.dumps({"client": scope["client"], "scheme": scope["scheme"]}).encode()
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-length", str(len(body)).encode()), (b"x-out", b"o1")]})
    await send({"type": "http.response.body", "body": body})


def exchange(srv: Any, request: bytes) -> tuple[bytes, dict[str, Any]]:
    """Send one request (on a connection the server closes) and return (head, JSON body)."""
    with srv.connect() as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, json.loads(body)


GET = b"GET /p?q=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: ua/1\r\nConnection: close\r\n"


def test_access_line_after_response(serve: Callable, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "uvworker.access")
    fmt = '%(h)s "%(r)s" %(s)s %(B)s %({user-agent}i)s %({x-out}o)s'
    with serve(echo_app, access_log=True, access_log_format=fmt) as srv:
        head, body = exchange(srv, GET + b"\r\n")
        assert head.startswith(b"HTTP/1.1 201 ")
        records = wait_for(lambda: [r for r in caplog.records if r.name == "uvworker.access"])
    length = len(json.dumps(body))
    assert [r.getMessage() for r in records] == [
        f'127.0.0.1 "GET /p?q=1 HTTP/1.1" 201 {length} ua/1 o1'
    ]


@pytest.mark.parametrize(
    "allow, client, scheme",
    [("127.0.0.1", ["203.0.113.5", 0], "https"), ("10.0.0.1", "127.0.0.1", "http")],
    ids=["trusted", "untrusted"],
)
def test_proxy_headers_through_server(
    serve: Callable, allow: str, client: Any, scheme: str
) -> None:
    proxy_headers = b"X-Forwarded-For: 203.0.113.5\r\nX-Forwarded-Proto: https\r\n\r\n"
    with serve(echo_app, forwarded_allow_ips=allow) as srv:
        _, body = exchange(srv, GET + proxy_headers)
    if isinstance(client, str):  # untrusted: the real peer, with its real port
        client = [client, body["client"][1]]
    assert (body["client"], body["scheme"]) == (client, scheme)


V2_HEADER = (
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"
    + bytes([198, 51, 100, 9, 127, 0, 0, 1]) + struct.pack("!HH", 4242, 80)
)


@pytest.mark.parametrize(
    "header", [b"PROXY TCP4 198.51.100.9 127.0.0.1 4242 80\r\n", V2_HEADER], ids=["v1", "v2"]
)
def test_proxy_protocol_through_server(serve: Callable, header: bytes) -> None:
    with serve(echo_app, proxy_protocol=True) as srv:
        _, body = exchange(srv, header + GET + b"\r\n")
    assert body["client"] == ["198.51.100.9", 4242]


def test_malformed_proxy_protocol_is_refused(serve: Callable) -> None:
    with serve(echo_app, proxy_protocol=True) as srv, srv.connect() as sock:
        sock.sendall(b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n" + GET + b"\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ")
