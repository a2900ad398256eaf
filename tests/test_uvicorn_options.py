"""Moving from uvicorn is a one-word change (issue 13, item 7): every option of the pinned
uvicorn's ``--help`` is accepted by ``uvworker`` with uvicorn's meaning, and each option that
came from uvicorn does what uvicorn's does, seen from outside (real processes and sockets).

When the uvicorn pin in pyproject.toml is raised, a new uvicorn option fails
``test_every_uvicorn_option_is_accepted`` until it is a row of the settings table and a line of
``UVICORN_COMMAND_LINE`` below.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for
from tests.http_client import Conn, build_request, respond
from tests.test_cli import ROOT, environment, one_error_line, serve_fd, uvworker
from tests.test_supervisor_cli import Served, served  # noqa: F401  (a fixture)
from tests.test_tls import make_cert
from uvworker.cli import parse
from uvworker.config import Config

# Options uvicorn has that another issue adds here; each must leave this list when it lands.
PENDING: dict[str, str] = {}


def help_options(command: list[str]) -> dict[str, bool]:
    """The long options a ``--help`` lists, each with whether it takes a value."""
    out = subprocess.run(
        command + ["--help"], capture_output=True, text=True, timeout=30, cwd=ROOT,
        env=environment({"COLUMNS": "100"}),
    )
    assert out.returncode == 0, out.stderr
    found: dict[str, bool] = {}
    for line in out.stdout.splitlines():
        spec = re.match(r"  (-\S.*?)(?:\s{2,}|$)", line)  # option lines; descriptions are indented deeper
        if spec:
            for option, metavar in re.findall(r"(--[a-z0-9][a-z0-9-]*)((?: [^\s,/-]\S*)?)", spec.group(1)):
                found[option] = bool(metavar)
    return found


@pytest.fixture(scope="module")
def uvicorn_options() -> dict[str, bool]:
    pin = re.search(r'"uvicorn==([0-9.*]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "the test extra pins uvicorn"
    assert re.fullmatch(pin.group(1).replace(".", r"\.").replace("*", r"\d+"), version("uvicorn")), (
        f"uvicorn {version('uvicorn')} is installed, the test extra pins {pin.group(1)}: pip install -e '.[test]'"
    )
    return help_options([sys.executable, "-m", "uvicorn"])


def test_every_uvicorn_option_is_accepted(uvicorn_options: dict[str, bool]) -> None:
    ours = help_options([sys.executable, "-m", "uvworker"])
    assert len(uvicorn_options) > 50 and "--reset-contextvars" in uvicorn_options  # the parse works
    assert not PENDING.keys() & ours.keys(), "these have landed: remove them from PENDING"
    assert sorted(uvicorn_options.keys() - ours.keys() - PENDING.keys()) == []
    differ = {o for o in uvicorn_options.keys() & ours.keys() if uvicorn_options[o] != ours[o]}
    assert sorted(differ) == [], "an option that takes a value in one takes none in the other"


# A uvicorn command line using every option, and what it means here. A new uvicorn option needs
# a line (test_the_command_line_covers_every_option).
UVICORN_COMMAND_LINE: list[tuple[list[str], dict[str, Any]]] = [
    (["--host", "0.0.0.0", "--port", "9000"], {"host": "0.0.0.0", "port": 9000}),
    (["--uds", "/tmp/app.sock", "--fd", "3"], {"uds": "/tmp/app.sock", "fd": 3}),
    (["--reload", "--reload-dir", "src", "--reload-include", "*.txt", "--reload-exclude", "tmp*",
      "--reload-delay", "1.5"],
     {"reload": True, "reload_dir": ["src"], "reload_include": ["*.txt"], "reload_exclude": ["tmp*"],
      "reload_delay": 1.5}),
    (["--workers", "4"], {"workers": 4}),
    (["--loop", "uvloop", "--http", "h11", "--ws", "websockets"], {"loop": "uvloop", "http": "h11", "ws": "websockets"}),
    (["--ws-max-size", "1024", "--ws-max-queue", "8", "--ws-ping-interval", "5", "--ws-ping-timeout", "6",
      "--ws-per-message-deflate", "false"],
     {"ws_max_size": 1024, "ws_max_queue": 8, "ws_ping_interval": 5.0, "ws_ping_timeout": 6.0,
      "ws_per_message_deflate": False}),
    (["--ws", "websockets-sansio"], {"ws": "websockets"}),
    (["--lifespan", "on", "--interface", "asgi3"], {"lifespan": "on", "interface": "asgi3"}),
    (["--env-file", "ENV_FILE"], {"env_file": "ENV_FILE"}),
    (["--log-config", "logging.json", "--log-level", "debug"], {"log_config": "logging.json", "log_level": "debug"}),
    (["--no-access-log", "--no-use-colors"], {"access_log": False, "use_colors": False}),
    (["--access-log", "--use-colors"], {"access_log": True, "use_colors": True}),
    (["--no-proxy-headers", "--no-server-header", "--no-date-header"],
     {"proxy_headers": False, "server_header": False, "date_header": False}),
    (["--proxy-headers", "--server-header", "--date-header"],
     {"proxy_headers": True, "server_header": True, "date_header": True}),
    (["--forwarded-allow-ips", "10.0.0.0/8,127.0.0.1", "--root-path", "/api"],
     {"forwarded_allow_ips": "10.0.0.0/8,127.0.0.1", "root_path": "/api"}),
    (["--limit-concurrency", "100", "--backlog", "512"], {"limit_concurrency": 100, "backlog": 512}),
    (["--limit-max-requests", "1000", "--limit-max-requests-jitter", "50"], {"max_requests": 1000, "max_requests_jitter": 50}),
    (["--timeout-keep-alive", "7", "--timeout-graceful-shutdown", "12", "--timeout-worker-healthcheck", "9"],
     {"timeout_keep_alive": 7.0, "timeout_graceful_shutdown": 12.0, "timeout_worker": 9.0}),
    (["--ssl-keyfile", "key.pem", "--ssl-certfile", "cert.pem", "--ssl-keyfile-password", "pw", "--ssl-version", "5",
      "--ssl-cert-reqs", "1", "--ssl-ca-certs", "ca.pem", "--ssl-ciphers", "ECDHE+AESGCM"],
     {"ssl_keyfile": "key.pem", "ssl_certfile": "cert.pem", "ssl_keyfile_password": "pw", "ssl_version": 5,
      "ssl_cert_reqs": 1, "ssl_ca_certs": "ca.pem", "ssl_ciphers": "ECDHE+AESGCM"}),
    (["--header", "X-A:1", "--header", "X-B: 2"], {"headers": [("X-A", "1"), ("X-B", "2")]}),
    (["--app-dir", "src", "--factory"], {"app_dir": "src", "factory": True}),
    (["--h11-max-incomplete-event-size", "32768", "--reset-contextvars"],
     {"h11_max_incomplete_event_size": 32768, "reset_contextvars": True}),
    (["--http2"], {"http2": True}),  # uvicorn's needs its zttp parser; ours is the h2 package
]


def test_the_command_line_covers_every_option(uvicorn_options: dict[str, bool]) -> None:
    used = {arg for args, _ in UVICORN_COMMAND_LINE for arg in args if arg.startswith("--")}
    expected = uvicorn_options.keys() - {"--help", "--version"} - PENDING.keys()
    assert sorted(expected - used) == []


@pytest.mark.parametrize("args, meaning", UVICORN_COMMAND_LINE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_uvicorn_command_line_means_the_same(args: list[str], meaning: dict[str, Any], tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("")
    args = [str(env_file) if arg == "ENV_FILE" else arg for arg in args]
    meaning = {k: str(env_file) if v == "ENV_FILE" else v for k, v in meaning.items()}
    assert parse(["main:app", *args], {}) == {"app": "main:app", **meaning}
    Config(**parse(["main:app", *args], {}))  # and the values are valid settings


# --- --env-file -----------------------------------------------------------------------------

ENV_APP = '''
import json, os
AT_IMPORT = os.environ.get("GREETING")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"import": AT_IMPORT, "now": os.environ.get("GREETING"),
                       "other": os.environ.get("OTHER")}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
'''


@pytest.mark.parametrize("mode", [[], ["--workers", "1"]], ids=["single", "supervised"])
def test_env_file_sets_what_the_app_sees_and_settings(tmp_path: Path, mode: list[str]) -> None:
    (tmp_path / "envapp.py").write_text(ENV_APP)
    env_file = tmp_path / "app.env"
    env_file.write_text(
        "# a comment\nGREETING='hello from the file'\nOTHER=${GREETING}!\n"
        'UVWORKER_HEADERS="X-From-Env-File: yes"\nUVWORKER_SERVER_HEADER=false\n'
    )
    with serve_fd("envapp:app", "--app-dir", str(tmp_path), "--env-file", str(env_file), "--server-header", *mode) as (_, url):
        response = httpx.get(url, timeout=10)
    assert response.json() == {"import": "hello from the file", "now": "hello from the file", "other": "hello from the file!"}
    assert response.headers["x-from-env-file"] == "yes"  # a UVWORKER_* setting from the file
    assert response.headers["server"] == "uvworker"  # the command line wins over the file


def test_env_file_never_overrides_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "app.env"
    env_file.write_text("UVWORKER_PORT=1\nUVWORKER_HOST=0.0.0.0\nGREETING=file\n")
    assert parse(["main:app", "--env-file", str(env_file)], {"UVWORKER_PORT": "9000"}) == {
        "app": "main:app", "env_file": str(env_file), "port": 9000, "host": "0.0.0.0",
    }
    assert parse(["main:app"], {"UVWORKER_ENV_FILE": str(env_file)})["host"] == "0.0.0.0"
    with pytest.MonkeyPatch.context() as patch:  # Config.load puts it into os.environ, no overriding
        patch.setenv("GREETING", "environment")
        patch.delenv("UVWORKER_HOST", raising=False)
        Config(lambda: None, env_file=str(env_file), interface="asgi3").load()
        assert (os.environ["GREETING"], os.environ["UVWORKER_HOST"]) == ("environment", "0.0.0.0")
        patch.delenv("UVWORKER_HOST")
        patch.delenv("UVWORKER_PORT")


def test_missing_env_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.env")
    assert one_error_line(uvworker("examples.hello:app", "--env-file", missing), 2) == (
        f"the --env-file {missing!r} does not exist"
    )


# --- --use-colors / --no-use-colors ---------------------------------------------------------

GREEN_INFO = "\x1b[32mINFO\x1b[0m"
GREEN_200 = "\x1b[32m200\x1b[0m"


@contextlib.contextmanager
def on_a_terminal(*args: str) -> Iterator[tuple[str, Callable[[], str]]]:
    """``uvworker *args`` with stdout and stderr on a pseudo-terminal; yields the URL and a
    function returning what the terminal showed so far."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvworker", "examples.hello:app", "--fd", str(sock.fileno()), *args],
            cwd=ROOT, env=environment(), pass_fds=[sock.fileno()], stdout=slave, stderr=slave,
        )
        os.close(slave)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        sock.close()
        shown = bytearray()

        def screen() -> str:
            while select.select([master], [], [], 0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal's other side is gone
                    break
                if not chunk:
                    break
                shown.extend(chunk)
            return shown.decode(errors="replace")

        try:
            yield url, screen
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
            os.close(master)


def get_and_wait_for_access_line(url: str, screen: Callable[[], str]) -> str:
    assert httpx.get(url, timeout=10).status_code == 200
    return wait_for(lambda: (lambda text: text if '"GET / HTTP/1.1"' in text else "")(screen()), timeout=10)


def test_colours_on_a_terminal_unless_turned_off() -> None:
    with on_a_terminal() as (url, screen):
        shown = get_and_wait_for_access_line(url, screen)
    assert GREEN_INFO in shown and GREEN_200 in shown
    with on_a_terminal("--no-use-colors") as (url, screen):
        shown = get_and_wait_for_access_line(url, screen)
    assert "\x1b[" not in shown


def test_colours_forced_into_pipes_and_never_into_a_log_config(tmp_path: Path) -> None:
    def logs(*args: str) -> tuple[str, str]:
        with serve_fd("examples.hello:app", *args) as (proc, url):
            assert httpx.get(url, timeout=10).status_code == 200
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=15)
        return out, err

    out, err = logs()
    assert "\x1b[" not in out + err and '"GET / HTTP/1.1" 200' in out  # a pipe is not a terminal
    out, err = logs("--use-colors")
    assert GREEN_INFO in err and f'"GET / HTTP/1.1" {GREEN_200}' in out
    log_config = tmp_path / "logging.ini"
    log_config.write_text(
        "[loggers]\nkeys=root,error,access\n[handlers]\nkeys=err,out\n[formatters]\nkeys=plain\n"
        "[logger_root]\nhandlers=\n[logger_error]\nqualname=uvworker.error\nhandlers=err\nlevel=INFO\n"
        "[logger_access]\nqualname=uvworker.access\nhandlers=out\nlevel=INFO\npropagate=0\n"
        "[handler_err]\nclass=StreamHandler\nformatter=plain\nargs=(sys.stderr,)\n"
        "[handler_out]\nclass=StreamHandler\nformatter=plain\nargs=(sys.stdout,)\n"
        "[formatter_plain]\nformat=%(levelname)s %(message)s\n"
    )
    out, err = logs("--use-colors", "--log-config", str(log_config))
    assert "\x1b[" not in out + err and "INFO " in err and '"GET / HTTP/1.1" 200' in out


# --- --reload-delay -------------------------------------------------------------------------


def log_times(log: str, text: str) -> list[datetime]:
    return [datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in log.splitlines() if text in line]


def test_reload_delay_is_the_time_between_two_looks_for_changes(served: Callable[..., Served], tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    watched.mkdir()
    server = served("--workers", "1", "--reload", "--reload-dir", str(watched), "--reload-delay", "3")
    server.serving_pids(1)

    def first_change_seen() -> bool:  # the watcher starts beside the workers: touch until it looks
        if "Detected changes in" in server.log:
            return True
        (watched / "first.py").write_text(str(time.monotonic()))
        time.sleep(0.2)
        return False

    wait_for(first_change_seen, timeout=15)
    (watched / "second.py").write_text("2")  # during the pause after the first look: one reload for both
    time.sleep(0.4)  # longer than watchfiles' own grouping (50 ms) and the default delay (0.25 s)
    (watched / "third.py").write_text("3")
    wait_for(lambda: len(log_times(server.log, "Detected changes in")) == 2, timeout=15)
    lines = [line for line in server.log.splitlines() if "Detected changes in" in line]
    assert "first.py" in lines[0] and "second.py" in lines[1] and "third.py" in lines[1], lines
    first, second = log_times(server.log, "Detected changes in")
    assert (second - first).total_seconds() >= 2.5


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, body=b"ok")


# --- --ssl-version --------------------------------------------------------------------------


def tls_version(port: int, minimum: ssl.TLSVersion | None = None) -> str:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if minimum is not None:
        context.minimum_version = minimum
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version())


@pytest.mark.parametrize("ssl_version, negotiated", [(17, "TLSv1.3"), (2, "TLSv1.3"), (5, "TLSv1.2")])
def test_ssl_version_sets_the_protocol(serve: Any, tmp_path: Path, ssl_version: int, negotiated: str) -> None:
    certfile, keyfile = make_cert(tmp_path)
    with serve(ok_app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile), ssl_version=ssl_version) as srv:
        assert tls_version(srv.port) == negotiated
        if negotiated == "TLSv1.2":  # only TLS 1.2: a client that insists on 1.3 is refused
            with pytest.raises(ssl.SSLError):
                tls_version(srv.port, minimum=ssl.TLSVersion.TLSv1_3)


def test_ssl_version_that_is_not_a_server_protocol_is_refused() -> None:
    result = uvworker("examples.hello:app", "--ssl-version", "16")
    assert one_error_line(result, 2) == "--ssl-version: 16 is not one of 17, 2, 5, 4, 3"


# --- --h11-max-incomplete-event-size --------------------------------------------------------


def status_for_head(srv: Any, padding: int) -> int:
    """The status for a head that arrives in two pieces: all but its last line first."""
    pads = [(f"X-Pad-{i}", "p" * min(7000, padding - i * 7000)) for i in range(0, (padding + 6999) // 7000)]
    request = build_request(headers=[*pads, ("Connection", "close")])
    with Conn.open(srv.host, srv.port) as conn:
        conn.send(request[:-2])
        with contextlib.suppress(TimeoutError):  # h11 refuses while the head is incomplete
            return conn.read_response(timeout=0.5).status
        conn.send(request[-2:])
        return conn.read_response().status


def test_h11_max_incomplete_event_size_bounds_the_h11_head(serve: Any, http_parser: str) -> None:
    with serve(ok_app, h11_max_incomplete_event_size=2000) as srv:
        assert status_for_head(srv, 1000) == 200
        assert status_for_head(srv, 3000) == (431 if http_parser == "h11" else 200)  # httptools: ignored
    with serve(ok_app) as srv:  # default: our own head bound, above h11's 16 KiB
        assert status_for_head(srv, 8000) == 200
        assert status_for_head(srv, 8000 * 3) == 200


# --- --reset-contextvars --------------------------------------------------------------------

CONTEXT_APP = '''
import contextvars
REQUEST = contextvars.ContextVar("request")
SET_AT_IMPORT = contextvars.ContextVar("set_at_import")
SET_AT_IMPORT.set("import")

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    seen = f"{SET_AT_IMPORT.get('-')} {REQUEST.get('-')}".encode()
    REQUEST.set("earlier request")
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "bytes": seen})
        await send({"type": "websocket.close"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(seen))]})
    await send({"type": "http.response.body", "body": seen})
'''


@pytest.mark.parametrize("reset, seen", [(False, b"import -"), (True, b"- -")], ids=["default", "reset"])
def test_reset_contextvars_hides_the_servers_context(tmp_path: Path, reset: bool, seen: bytes) -> None:
    from websockets.sync.client import connect

    (tmp_path / "ctxapp.py").write_text(CONTEXT_APP)
    args = ["ctxapp:app", "--app-dir", str(tmp_path)] + (["--reset-contextvars"] if reset else [])
    with serve_fd(*args) as (_, url), httpx.Client(timeout=10) as client:
        assert [client.get(url).content for _ in range(3)] == [seen] * 3  # keep-alive: nothing carried over
        with connect(url.replace("http", "ws", 1) + "/ws", open_timeout=10) as ws:
            assert ws.recv(timeout=10) == seen


# --- --timeout-worker-healthcheck -----------------------------------------------------------


def test_timeout_worker_healthcheck_replaces_a_worker_that_stops_answering(served: Callable[..., Served]) -> None:
    server = served("--workers", "1", "--timeout-worker-healthcheck", "1.5")
    first = server.get()
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url + "block", timeout=8)  # blocks the worker's event loop
    server.wait_log("sent no heartbeat for 1.5 s")
    wait_for(lambda: server.try_get() not in (first, None), timeout=15)
