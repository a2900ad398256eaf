"""TLS (issue 2): HTTPS with a self-signed certificate made here, no plaintext fallback, and a
certificate that cannot be loaded is a ConfigError when the config is loaded."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.http_client import Conn, build_request, respond
from uvworker.config import Config, ConfigError


def make_cert(directory: Path, password: bytes | None = None) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return certfile, keyfile


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


async def scheme_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, body=scope["scheme"].encode())


def test_https_with_httpx(serve: Any, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    with serve(scheme_app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as srv:
        url = f"https://{srv.host}:{srv.port}/"
        with httpx.Client(verify=False, timeout=3) as client:
            for _ in range(2):  # keep-alive over TLS
                r = client.get(url)
                assert r.status_code == 200
                assert r.text == "https"


def test_https_raw_request_verifies_against_the_cert(serve: Any, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    context = ssl.create_default_context(cafile=str(certfile))
    with serve(scheme_app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as srv:
        raw = socket.create_connection((srv.host, srv.port), timeout=3)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            conn = Conn(tls)
            conn.send(build_request(headers=[("Connection", "close")]))
            resp = conn.read_response()
            assert (resp.status, resp.body) == (200, b"https")


def test_plaintext_request_to_tls_port_is_not_served(serve: Any, cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    with serve(scheme_app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)) as srv:
        with Conn.open(srv.host, srv.port) as conn:
            conn.send(build_request())
            data = conn.read_until_close(timeout=3)
        assert b"https" not in data
        assert not data.startswith(b"HTTP/1.1 200")


def test_encrypted_key_with_password(serve: Any, tmp_path: Path) -> None:
    certfile, keyfile = make_cert(tmp_path, password=b"s3cret")
    settings = {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile), "ssl_keyfile_password": "s3cret"}
    with serve(scheme_app, **settings) as srv:
        r = httpx.get(f"https://{srv.host}:{srv.port}/", verify=False, timeout=3)
        assert r.text == "https"


def test_missing_cert_file_is_config_error(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    _, keyfile = cert
    config = Config(scheme_app, ssl_certfile=str(tmp_path / "missing.pem"), ssl_keyfile=str(keyfile))
    with pytest.raises(ConfigError) as info:
        config.load()
    assert "missing.pem" in str(info.value)


def test_key_not_matching_cert_is_config_error(tmp_path: Path, cert: tuple[Path, Path]) -> None:
    certfile, _ = cert
    (tmp_path / "other").mkdir()
    _, other_key = make_cert(tmp_path / "other")
    config = Config(scheme_app, ssl_certfile=str(certfile), ssl_keyfile=str(other_key))
    with pytest.raises(ConfigError):
        config.load()


def test_garbage_cert_is_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    config = Config(scheme_app, ssl_certfile=str(bad), ssl_keyfile=str(bad))
    with pytest.raises(ConfigError):
        config.load()


def test_wrong_key_password_is_config_error(tmp_path: Path) -> None:
    certfile, keyfile = make_cert(tmp_path, password=b"right")
    config = Config(scheme_app, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile), ssl_keyfile_password="wrong")
    with pytest.raises(ConfigError):
        config.load()
