"""The ``uvworker`` command through real subprocesses (issue 2: CLI, exit codes, examples)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for
from uvworker.cli import parse
from uvworker.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
FAILING_LIFESPAN = """
async def app(scope, receive, send):
    assert scope["type"] == "lifespan"
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
"""


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UVWORKER_") and k != "FORWARDED_ALLOW_IPS"}
    return env | (extra or {})


def uvworker(
    *args: str, env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the command to completion (failing cases: the server never gets to serve)."""
    return subprocess.run(
        [sys.executable, "-m", "uvworker", *args], cwd=ROOT, env=environment(env), pass_fds=pass_fds,
        capture_output=True, text=True, timeout=20,
    )


@contextlib.contextmanager
def listening() -> Iterator[socket.socket]:
    """A bound, listening socket on an ephemeral port, to hand over with --fd."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@contextlib.contextmanager
def running(
    *args: str, env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()
) -> Iterator[subprocess.Popen[str]]:
    """A server process; on exit it gets SIGTERM and must stop cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvworker", *args], cwd=ROOT, env=environment(env), pass_fds=pass_fds,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err


def serve_fd(*args: str) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[str], str]]:
    """Run ``uvworker *args --fd N`` on a socket bound here; yields the process and base URL."""

    @contextlib.contextmanager
    def manager() -> Iterator[tuple[subprocess.Popen[str], str]]:
        with listening() as sock:
            fd = sock.fileno()
            host, port = sock.getsockname()
            with running(*args, "--fd", str(fd), pass_fds=[fd]) as proc:
                sock.close()  # the server holds the only copy: if it dies, clients are refused
                yield proc, f"http://{host}:{port}"

    return manager()


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uvworker: error: "), result.stderr
    return lines[0].removeprefix("uvworker: error: ")


def test_help_lists_every_option() -> None:
    result = uvworker("--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.env in result.stdout
        for flag in setting.flags:
            assert flag in result.stdout


def test_version() -> None:
    result = uvworker("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"uvworker \d+\.\d+\.\d+\S* with \w+ 3\.\d+\.\d+\S* on \w+\n", result.stdout)


@pytest.mark.parametrize(
    "args, env, message",
    [
        (["examples.hello:app", "--bogus"], {}, "unrecognized arguments: --bogus"),
        (["examples.hello:app", "--port", "abc"], {}, "--port: 'abc' is not an integer"),
        (["examples.hello:app", "--http", "curl"], {}, "--http: 'curl' is not one of auto, httptools, h11"),
        (["examples.hello:app", "--timeout-keep-alive"], {}, "--timeout-keep-alive: expected one argument"),
        (["examples.hello"], {}, "APP: 'examples.hello' is not of the form module:attribute"),
        ([], {}, "no application given: name it as module:attribute, e.g. uvworker main:app"),
        (["examples.hello:app"], {"UVWORKER_PORT": "abc"}, "UVWORKER_PORT: 'abc' is not an integer"),
    ],
)
def test_invalid_usage_is_one_line_and_exit_code_2(args: list[str], env: dict[str, str], message: str) -> None:
    assert one_error_line(uvworker(*args, env=env), 2) == message


def test_unimportable_app_is_one_line_and_exit_code_1() -> None:
    result = uvworker("no_such_module_xyz:app", "--port", "0")
    assert one_error_line(result, 1) == (
        "cannot import module 'no_such_module_xyz': ModuleNotFoundError: No module named 'no_such_module_xyz'"
    )
    debug = uvworker("no_such_module_xyz:app", "--port", "0", "--log-level", "debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "uvworker: error: cannot import module 'no_such_module_xyz'" in debug.stderr


def test_configuration_that_cannot_be_loaded_is_exit_code_1(tmp_path: Path) -> None:
    missing = str(tmp_path / "cert.pem")
    result = uvworker("examples.hello:app", "--port", "0", "--ssl-certfile", missing)
    assert one_error_line(result, 1) == (
        f"cannot load the TLS certificate and key from {missing!r}: No such file or directory"
    )
    with listening() as taken:
        port = taken.getsockname()[1]
        result = uvworker("examples.hello:app", "--port", str(port))
    assert one_error_line(result, 1) == f"cannot listen on 127.0.0.1:{port}: Address already in use"


def test_lifespan_startup_failure_is_exit_code_3(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING_LIFESPAN)
    with listening() as sock:
        fd = str(sock.fileno())
        result = uvworker("failing:app", "--app-dir", str(tmp_path), "--fd", fd, pass_fds=[sock.fileno()])
        assert result.returncode == 3, result.stderr
        script = f"import uvworker; uvworker.run('failing:app', app_dir={str(tmp_path)!r}, fd={fd})"
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=environment(), pass_fds=[sock.fileno()],
            capture_output=True, text=True, timeout=20,
        )
        assert result.returncode == 3, result.stderr


def test_log_config_files(tmp_path: Path) -> None:
    (tmp_path / "failing.py").write_text(FAILING_LIFESPAN)
    log_config = tmp_path / "logging.json"
    log_config.write_text(json.dumps({
        "version": 1,
        "formatters": {"plain": {"format": "CUSTOM %(levelname)s %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {"uvworker.error": {"handlers": ["err"], "level": "INFO", "propagate": False}},
    }))
    args = ["failing:app", "--app-dir", str(tmp_path), "--port", "0"]
    result = uvworker(*args, "--log-config", str(log_config))  # lifespan fails before listening
    assert result.returncode == 3
    assert "CUSTOM ERROR" in result.stderr and "database unreachable" in result.stderr
    missing = str(tmp_path / "missing.ini")
    assert missing in one_error_line(uvworker(*args, "--log-config", missing), 1)


def test_command_line_beats_environment_beats_defaults() -> None:
    environ = {"UVWORKER_PORT": "9000", "UVWORKER_HOST": "0.0.0.0", "UVWORKER_APP": "env:app",
               "FORWARDED_ALLOW_IPS": "*", "UVWORKER_HEADERS": "X-A: 1"}
    settings = parse(["cli:app", "--port", "9001", "--header", "X-B: 2", "--no-access-log"], environ)
    assert settings == {"app": "cli:app", "port": 9001, "host": "0.0.0.0", "forwarded_allow_ips": "*",
                        "headers": [("X-B", "2")], "access_log": False}
    assert parse([], environ)["app"] == "env:app"


def test_hello_example_serves() -> None:
    with serve_fd("examples.hello:app", "--header", "X-Served-By: test") as (proc, url):
        response = httpx.get(url, timeout=10)
        assert (response.status_code, response.text) == (200, "Hello, world!\n")
        assert response.headers["x-served-by"] == "test"


def test_starlette_example_serves_with_lifespan_state() -> None:
    pytest.importorskip("starlette")
    with serve_fd("examples.starlette_app:app", "--lifespan", "on") as (proc, url):
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/").json() == {"hello": "world", "visit": 1}
            assert client.get("/hello/team").json() == {"hello": "team", "visit": 2}
            assert client.post("/echo", content=b"x" * 100_000).content == b"x" * 100_000


def test_port_from_environment() -> None:
    with listening() as probe:
        port = probe.getsockname()[1]  # free once closed; the server binds it again
    with running("examples.hello:app", env={"UVWORKER_PORT": str(port)}) as proc:

        def answered() -> httpx.Response | None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
            return None

        assert wait_for(answered, timeout=10).text == "Hello, world!\n"


def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    with running("examples.hello:app", "--uds", str(path)) as proc:
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport, timeout=5) as client:

            def answered() -> httpx.Response | None:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                with contextlib.suppress(httpx.TransportError):
                    return client.get("http://localhost/")
                return None

            assert wait_for(answered, timeout=10).text == "Hello, world!\n"
    assert not path.exists()  # removed on shutdown


def test_single_process_signals_hup_ignored_usr1_reopens_logs(tmp_path: Path) -> None:
    """Without --workers, SIGHUP does not kill the server (it is logged), and SIGUSR1 reopens
    log files so that a rotated access log is written anew."""
    access = tmp_path / "access.log"
    log_config = tmp_path / "logging.json"
    log_config.write_text(json.dumps({
        "version": 1,
        "handlers": {"file": {"class": "logging.FileHandler", "filename": str(access)}},
        "loggers": {"uvworker.access": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }))
    with serve_fd("examples.hello:app", "--log-config", str(log_config)) as (proc, url):
        assert httpx.get(url + "/before", timeout=10).status_code == 200
        wait_for(lambda: "/before" in access.read_text())
        proc.send_signal(signal.SIGHUP)
        access.rename(tmp_path / "access.log.1")  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: access.exists())
        assert httpx.get(url + "/after", timeout=10).status_code == 200
        wait_for(lambda: "/after" in access.read_text())
        assert proc.poll() is None


def test_single_process_scaling_signals_are_ignored(tmp_path: Path) -> None:
    """Without --workers, SIGTTIN and SIGTTOU (a supervisor's scaling signals, sent by habit or
    to a whole group) are logged and ignored. Before, their default action stopped the process:
    every request hung until a SIGCONT."""
    with serve_fd("examples.hello:app") as (proc, url):
        assert httpx.get(url + "/", timeout=10).status_code == 200  # serving: its handlers are in place
        for sig in (signal.SIGTTIN, signal.SIGTTOU):
            proc.send_signal(sig)
            assert httpx.get(url + "/", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        err = proc.stderr.read() if proc.stderr else ""
    assert "SIGTTIN ignored: changing the number of workers needs --workers." in err
    assert "SIGTTOU ignored" in err


def test_the_error_line_is_written_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share stderr with the supervisor: the line and its newline go in one write, or
    another process's line lands in between ("...: boom2026-12-02 ... [ERROR] Worker 2 ...")."""
    from uvworker.errors import ConfigError, report

    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    report(ConfigError("cannot import module 'app': RuntimeError: boom"))
    assert writes == ["uvworker: error: cannot import module 'app': RuntimeError: boom\n"]
