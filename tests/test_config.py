"""Config: validation, derived objects, TLS and listening sockets (issue 2: settings, TLS)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from examples.hello import app as hello_app
from uvworker.config import Config
from uvworker.errors import ConfigError
from uvworker.server import listen
from uvworker.errors import AppImportError
from uvworker.interfaces.asgi2 import ASGI2Adapter
from uvworker.logging import AccessLog
from uvworker.proxy import TrustedHosts


def loaded(app: Any = hello_app, **settings: Any) -> Config:
    config = Config(app, **settings)
    config.load()
    return config


def test_settings_become_attributes_with_defaults() -> None:
    config = Config("examples.hello:app", port=9000, headers=["X-Team: core"])
    assert (config.app, config.port, config.host, config.headers) == (
        "examples.hello:app", 9000, "127.0.0.1", [("X-Team", "core")]
    )


def test_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown setting.*: prot"):
        Config(hello_app, prot=80)


def test_invalid_value_is_a_value_error_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^port: 'http' is not an integer$"):
        Config(hello_app, port="http")


def test_init_imports_nothing() -> None:
    Config("no_such_module_anywhere:app")  # only load() imports
    assert "no_such_module_anywhere" not in sys.modules


def test_load_is_idempotent_and_computes_derived_objects() -> None:
    config = loaded(headers=["X-Team: Core"], http="h11", loop="asyncio")
    app = config.loaded_app
    config.load()
    assert config.loaded_app is app is hello_app
    assert config.http_parser == "h11"
    assert config.loop_factory is asyncio.new_event_loop
    assert config.default_headers == [(b"x-team", b"Core")]
    assert config.ssl_context is None
    assert isinstance(config.forwarded_allow, TrustedHosts) and isinstance(config.proxy_allow, TrustedHosts)
    assert "127.0.0.1" in config.forwarded_allow and "10.0.0.1" not in config.forwarded_allow
    assert isinstance(config.access_log_writer, AccessLog)
    assert loaded(access_log=False).access_log_writer is None


def test_bad_access_log_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="access log format"):
        loaded(access_log_format="%(h)d")


def test_auto_picks_the_fast_packages_when_installed() -> None:
    pytest.importorskip("httptools")
    uvloop = pytest.importorskip("uvloop")
    config = loaded()
    assert config.http_parser == "httptools"
    assert config.loop_factory is uvloop.new_event_loop


def test_missing_optional_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httptools", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "uvloop", None)
    monkeypatch.setitem(sys.modules, "websockets", None)
    config = loaded()
    assert (config.http_parser, config.loop_factory) == ("h11", asyncio.new_event_loop)
    with pytest.raises(ConfigError, match=r"^--http httptools needs the httptools package"):
        loaded(http="httptools")
    with pytest.raises(ConfigError, match=r"^--loop uvloop needs the uvloop package"):
        loaded(loop="uvloop")
    with pytest.raises(ConfigError, match=r"^--ws websockets needs the websockets package"):
        loaded(ws="websockets")


# The application: import, factory, interface ------------------------------------------------


class ASGI2App:
    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope

    async def __call__(self, receive: Any, send: Any) -> None:
        await send({"type": "seen", "path": self.scope["path"]})


def asgi2_function(scope: dict[str, Any]) -> Callable[..., Any]:
    async def instance(receive: Any, send: Any) -> None:
        await send({"type": "seen", "path": scope["path"]})

    return instance


class ASGI3Object:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "seen", "path": scope["path"]})


def call(app: Any) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "path": "/x"}, receive, send))
    return sent


@pytest.mark.parametrize("app", [ASGI2App, asgi2_function], ids=["class", "function"])
def test_asgi2_apps_are_detected_and_adapted(app: Any) -> None:
    loaded_app = loaded(app).loaded_app
    assert isinstance(loaded_app, ASGI2Adapter)
    assert call(loaded_app) == [{"type": "seen", "path": "/x"}]


def test_asgi3_object_is_used_as_is() -> None:
    app = ASGI3Object()
    assert loaded(app).loaded_app is app
    assert call(app) == [{"type": "seen", "path": "/x"}]


def test_interface_can_be_forced() -> None:
    assert isinstance(loaded(ASGI3Object(), interface="asgi2").loaded_app, ASGI2Adapter)
    assert loaded(ASGI2App, interface="asgi3").loaded_app is ASGI2App


def test_import_from_app_dir_and_factory(tmp_path: Path) -> None:
    (tmp_path / "factory_mod.py").write_text(
        "from examples.hello import app as hello\n"
        "def create():\n    return hello\n"
        "class holder:\n    app = hello\n"
    )
    assert loaded("factory_mod:create", app_dir=str(tmp_path), factory=True).loaded_app is hello_app
    assert loaded("factory_mod:holder.app", app_dir=str(tmp_path)).loaded_app is hello_app


@pytest.mark.parametrize(
    "source, spec, settings, message",
    [
        (None, "no_such_mod_xyz:app", {}, "cannot import module 'no_such_mod_xyz': ModuleNotFoundError: "
         "No module named 'no_such_mod_xyz'"),
        ("raise RuntimeError('no database')\n", "broken_mod:app", {},
         "cannot import module 'broken_mod': RuntimeError: no database"),
        ("import no_such_dependency_xyz\n", "needs_dep_mod:app", {},
         "cannot import module 'needs_dep_mod': ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
        ("app = 1\n", "attr_mod:application", {}, "module 'attr_mod' has no attribute 'application'"),
        ("app = {}\n", "dict_mod:app", {}, "the application dict_mod:app is a dict, not a callable"),
        ("def make():\n    raise KeyError('SECRET')\n", "fact_mod:make", {"factory": True},
         "the application factory fact_mod:make failed: KeyError: 'SECRET'"),
    ],
)
def test_app_that_cannot_be_loaded(
    tmp_path: Path, source: str | None, spec: str, settings: dict[str, Any], message: str
) -> None:
    module = spec.partition(":")[0]
    if source is not None:
        (tmp_path / f"{module}.py").write_text(source)
    with pytest.raises(ConfigError) as info:
        loaded(spec, app_dir=str(tmp_path), **settings)
    assert str(info.value) == message
    assert isinstance(info.value, AppImportError) == ("is a dict" not in message)


# TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1, its key, an encrypted copy and an unrelated key."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    files = {name: str(d / f"{name}.pem") for name in ("cert", "key", "other_key", "encrypted_key")}

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", files["key"], "-out", files["cert"])
    openssl("genpkey", "-algorithm", "RSA", "-out", files["other_key"])
    openssl("pkey", "-in", files["key"], "-aes256", "-passout", "pass:s3cret", "-out", files["encrypted_key"])
    return files


def test_tls_context_from_settings(tls: dict[str, str]) -> None:
    config = loaded(ssl_certfile=tls["cert"], ssl_keyfile=tls["key"], ssl_ca_certs=tls["cert"], ssl_cert_reqs=1)
    assert isinstance(config.ssl_context, ssl.SSLContext)
    assert config.ssl_context.verify_mode == ssl.CERT_OPTIONAL
    encrypted = loaded(ssl_certfile=tls["cert"], ssl_keyfile=tls["encrypted_key"], ssl_keyfile_password="s3cret")
    assert encrypted.ssl_context is not None


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"ssl_certfile": "/nonexistent/cert.pem"}, "'/nonexistent/cert.pem': No such file or directory"),
        ({"ssl_certfile": "{cert}", "ssl_keyfile": "{other_key}"}, "key values mismatch"),
        ({"ssl_certfile": "{cert}", "ssl_keyfile": "{encrypted_key}"}, "wrong --ssl-keyfile-password"),
        ({"ssl_certfile": "{cert}", "ssl_keyfile": "{encrypted_key}", "ssl_keyfile_password": "nope"},
         "wrong --ssl-keyfile-password"),
        ({"ssl_certfile": "{key}"}, "not a PEM certificate and private key"),
        ({"ssl_keyfile": "{key}"}, "--ssl-keyfile was given without --ssl-certfile"),
        ({"ssl_certfile": "{cert}", "ssl_keyfile": "{key}", "ssl_ciphers": "NOPE"}, "selects no cipher"),
        ({"ssl_certfile": "{cert}", "ssl_keyfile": "{key}", "ssl_ca_certs": "/nonexistent/ca.pem"},
         "cannot load --ssl-ca-certs '/nonexistent/ca.pem'"),
    ],
)
def test_tls_that_cannot_be_set_up_is_a_config_error(
    tls: dict[str, str], settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("-", r"\-")):
        loaded(**{name: value.format(**tls) for name, value in settings.items()})


def test_tls_serves_https(tls: dict[str, str], serve: Any) -> None:
    with serve(hello_app, ssl_certfile=tls["cert"], ssl_keyfile=tls["key"]) as srv:
        verify = ssl.create_default_context(cafile=tls["cert"])
        response = httpx.get(f"https://{srv.host}:{srv.port}/", verify=verify, timeout=5)
        assert response.text == "Hello, world!\n"
        with pytest.raises(httpx.RemoteProtocolError):  # no plaintext on a TLS port
            httpx.get(f"http://{srv.host}:{srv.port}/", timeout=5)


# Listening sockets --------------------------------------------------------------------------


def accepts(sock: socket.socket) -> bool:
    address = sock.getsockname()
    family = socket.AF_UNIX if isinstance(address, str) else sock.family
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        client.connect(address)
    return True


def test_bind_host_and_port() -> None:
    [sock] = listen(Config(hello_app, port=0, backlog=16))
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
        assert accepts(sock)


def test_port_in_use_is_a_config_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"^cannot listen on 127.0.0.1:{port}: Address already in use$"):
            listen(Config(hello_app, port=port))


def test_bind_unix_socket_replacing_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "app.sock")
    with socket.socket(socket.AF_UNIX) as stale:  # bound, never listening: left by a dead server
        stale.bind(path)
    [sock] = listen(Config(hello_app, uds=path))
    with sock:
        assert accepts(sock)
        assert os.stat(path).st_mode & 0o777 == 0o666
        with pytest.raises(ConfigError, match=f"^cannot listen on unix socket {path}: Address already in use$"):
            listen(Config(hello_app, uds=path))  # a live server's socket is left alone


def test_unix_socket_path_that_is_a_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="cannot listen on unix socket"):
        listen(Config(hello_app, uds=str(path)))
    assert path.read_text() == "keep me"


def test_bind_inherited_file_descriptor() -> None:
    with socket.create_server(("127.0.0.1", 0)) as inherited:
        [sock] = listen(Config(hello_app, fd=os.dup(inherited.fileno())))
        with sock:
            assert sock.getsockname() == inherited.getsockname()
            assert accepts(sock)
    with pytest.raises(ConfigError, match="^cannot listen on socket file descriptor 9999: Bad file descriptor$"):
        listen(Config(hello_app, fd=9999))
