"""The ASGI ``tls`` extension (asgiref specs/tls.rst) on HTTPS, on both parsers: the server's
certificate, the client's chain and RFC 4514 name (with a CA-signed client certificate, and
without one), the version and cipher suite as the protocol's numbers (checked against the
names the client's own ssl module reports, for TLS 1.3 and 1.2). The Subject's RFC 4514 form
is checked without sockets against ``cryptography``'s for the attributes both write alike.
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.http_client import Conn, build_request, respond
from tests.test_tls import make_cert
from uvworker.core.tls import rfc4514_subject

# IANA numbers of the suites OpenSSL may pick here, by OpenSSL's names (RFC 8446, RFC 8289, RFC 7905).
SUITES = {
    "TLS_AES_128_GCM_SHA256": 0x1301, "TLS_AES_256_GCM_SHA384": 0x1302, "TLS_CHACHA20_POLY1305_SHA256": 0x1303,
    "ECDHE-ECDSA-AES128-GCM-SHA256": 0xC02B, "ECDHE-ECDSA-AES256-GCM-SHA384": 0xC02C,
    "ECDHE-ECDSA-CHACHA20-POLY1305": 0xCCA9,
}


def issue(subject: x509.Name, issuer: x509.Name | None = None, issuer_key: Any = None, ca: bool = False) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key or key, hashes.SHA256())
    )
    return cert, key


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- the Subject as RFC 4514 writes it, no sockets ---------------------------------------------------
def name(*rdns: list[tuple[Any, str]]) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(oid, value) for oid, value in rdn]) for rdn in rdns])


@pytest.mark.parametrize("subject", [
    name([(NameOID.COMMON_NAME, "client")]),
    name([(NameOID.COUNTRY_NAME, "DE")], [(NameOID.ORGANIZATION_NAME, "Acme, Inc.")],
         [(NameOID.ORGANIZATIONAL_UNIT_NAME, "R&D")], [(NameOID.COMMON_NAME, "Zoë +1 <x>;")]),
    name([(NameOID.DOMAIN_COMPONENT, "org")], [(NameOID.DOMAIN_COMPONENT, "example")],
         [(NameOID.COMMON_NAME, "a"), (NameOID.USER_ID, "b")]),  # a multi-valued RDN
    name([(NameOID.COMMON_NAME, "#lead and trail ")]),
], ids=["cn", "specials", "multi-valued", "leading-hash"])
def test_rfc4514_subject_agrees_with_cryptography(subject: x509.Name) -> None:
    cert, _ = issue(subject)
    assert rfc4514_subject(cert.public_bytes(serialization.Encoding.DER)) == subject.rfc4514_string()


def test_rfc4514_subject_writes_other_attributes_as_hex_ber() -> None:
    cert, _ = issue(name([(NameOID.EMAIL_ADDRESS, "a@b.c")], [(NameOID.COMMON_NAME, "c")]))
    ber = bytes([0x16, 5]) + b"a@b.c"  # IA5String
    assert rfc4514_subject(cert.public_bytes(serialization.Encoding.DER)) == f"CN=c,1.2.840.113549.1.9.1=#{ber.hex()}"


# -- over real TLS connections -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    certfile, keyfile = make_cert(directory)
    ca_name = name([(NameOID.COMMON_NAME, "test CA")])
    ca, ca_key = issue(ca_name, ca=True)
    client_name = name([(NameOID.COUNTRY_NAME, "FR")], [(NameOID.ORGANIZATION_NAME, "Example, Ltd")],
                       [(NameOID.COMMON_NAME, "client one")])
    client, client_key = issue(client_name, ca_name, ca_key)
    (directory / "ca.pem").write_text(pem(ca))
    (directory / "client.pem").write_text(pem(client))
    (directory / "client.key").write_bytes(client_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {"dir": directory, "certfile": certfile, "keyfile": keyfile, "client": client, "client_name": client_name}


async def tls_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await respond(send, body=json.dumps(scope["extensions"].get("tls")).encode())


def fetch(srv: Any, context: ssl.SSLContext) -> tuple[dict[str, Any], ssl.SSLSocket]:
    raw = socket.create_connection((srv.host, srv.port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    conn = Conn(sock)  # type: ignore[arg-type]
    conn.send(build_request())
    resp = conn.read_response()
    assert resp.status == 200
    return json.loads(resp.body), sock


def client_context(pki: dict[str, Any], with_cert: bool, tls12: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["certfile"]))
    if with_cert:
        context.load_cert_chain(str(pki["dir"] / "client.pem"), str(pki["dir"] / "client.key"))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@pytest.mark.parametrize("tls12", [False, True], ids=["tls1.3", "tls1.2"])
def test_tls_extension_with_a_client_certificate(serve: Any, pki: dict[str, Any], tls12: bool) -> None:
    settings = {"ssl_certfile": str(pki["certfile"]), "ssl_keyfile": str(pki["keyfile"]),
                "ssl_ca_certs": str(pki["dir"] / "ca.pem"), "ssl_cert_reqs": int(ssl.CERT_REQUIRED)}
    with serve(tls_app, **settings) as srv:
        tls, sock = fetch(srv, client_context(pki, with_cert=True, tls12=tls12))
        with sock:
            version, cipher = sock.version(), sock.cipher()
    assert tls["server_cert"].strip() == Path(pki["certfile"]).read_text().strip()
    assert tls["client_cert_chain"][0] == pem(pki["client"])
    assert tls["client_cert_name"] == pki["client_name"].rfc4514_string() == "CN=client one,O=Example\\, Ltd,C=FR"
    assert tls["client_cert_error"] is None
    assert tls["tls_version"] == (0x0303 if tls12 else 0x0304) and version == ("TLSv1.2" if tls12 else "TLSv1.3")
    assert cipher is not None and tls["cipher_suite"] == SUITES[cipher[0]]


def test_tls_extension_without_a_client_certificate(serve: Any, pki: dict[str, Any]) -> None:
    with serve(tls_app, ssl_certfile=str(pki["certfile"]), ssl_keyfile=str(pki["keyfile"])) as srv:
        tls, sock = fetch(srv, client_context(pki, with_cert=False))
        sock.close()
    assert tls["client_cert_chain"] == [] and tls["client_cert_name"] is None and tls["client_cert_error"] is None
    assert tls["server_cert"].startswith("-----BEGIN CERTIFICATE-----") and tls["tls_version"] == 0x0304
    assert tls["cipher_suite"] in SUITES.values()


def test_wss_scope_has_the_tls_extension(serve: Any, pki: dict[str, Any]) -> None:
    from websockets.sync.client import connect

    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close"})

    with serve(app, ssl_certfile=str(pki["certfile"]), ssl_keyfile=str(pki["keyfile"])) as srv:
        context = client_context(pki, with_cert=False)
        with connect(f"wss://127.0.0.1:{srv.port}/", ssl=context, proxy=None, open_timeout=5) as ws:
            with pytest.raises(Exception):
                ws.recv(timeout=5)
    extensions = seen[0]["extensions"]
    assert set(extensions) == {"websocket.http.response", "tls"} and extensions["tls"]["tls_version"] == 0x0304


def test_rfc4514_subject_reads_bmp_and_universal_strings() -> None:
    from cryptography.x509.name import _ASN1Type

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Zoë", _type=_ASN1Type.BMPString),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ünï", _type=_ASN1Type.UniversalString)])
    cert, _ = issue(subject)
    assert rfc4514_subject(cert.public_bytes(serialization.Encoding.DER)) == "O=Ünï,CN=Zoë"


GUNICORN_APP = '''
import json, os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    extensions = scope["extensions"]
    if scope["path"] == "/file":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": os.path.abspath(__file__)})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps(
        {"names": sorted(extensions), "tls_version": extensions["tls"]["tls_version"],
         "server_cert": extensions["tls"]["server_cert"]}).encode()})
'''


@pytest.mark.parametrize("worker_class", ["uvworker.Worker", "uvworker.H11Worker"])
def test_extensions_under_gunicorn_with_certfile(tmp_path: Path, pki: dict[str, Any], worker_class: str) -> None:
    import httpx

    from tests.test_gunicorn import run_gunicorn

    conf = f"certfile = {str(pki['certfile'])!r}\nkeyfile = {str(pki['keyfile'])!r}\n"
    with run_gunicorn(tmp_path, worker_class, conf, app=GUNICORN_APP) as server, \
            httpx.Client(verify=False, http2=False, timeout=10) as client:
        url = f"https://127.0.0.1:{server.port}"
        info = client.get(url + "/").json()
        body = client.get(url + "/file")
    assert {"http.response.pathsend", "http.response.early_hint", "http.response.trailers", "tls"} <= set(info["names"])
    assert info["tls_version"] == 0x0304 and info["server_cert"].strip() == Path(pki["certfile"]).read_text().strip()
    assert body.content == (tmp_path / "app.py").read_bytes()
    assert body.headers["content-length"] == str(len(body.content))
