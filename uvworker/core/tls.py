"""The ASGI ``tls`` extension (asgiref, specs/tls.rst, version 0.2): what the scope of a request
on a TLS connection says about that connection. Computed once per connection; no I/O beyond
reading the server's own certificate file once.

* ``server_cert``: the PEM of the first certificate in the server's certificate file (Python's
  ssl module does not hand back the certificate it presented).
* ``client_cert_chain``: PEM strings, the client's certificate first; the whole verified chain
  where Python offers it (3.13+), else the client's certificate alone; empty without one.
* ``client_cert_name``: the client certificate's Subject as an RFC 4514 string, read from the
  certificate's DER: RDNs last to first, the RFC's short names (CN, O, ...) else the dotted
  OID with the value as ``#`` and the hex of its BER encoding; special characters escaped.
* ``client_cert_error``: None. A certificate that fails verification fails the handshake, so
  no request ever carries one.
* ``tls_version``, ``cipher_suite``: the protocol's numbers (0x0304 for TLS 1.3; the suite's
  two bytes, e.g. 0x1301 for TLS_AES_128_GCM_SHA256), None if unknown.
"""

from __future__ import annotations

import ssl
from typing import Any

TLS_VERSIONS = {"SSLv3": 0x0300, "TLSv1": 0x0301, "TLSv1.1": 0x0302, "TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
# RFC 4514 §3: the attribute types a string representation names by a short name.
SHORT_NAMES = {
    "2.5.4.3": "CN", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
    "2.5.4.6": "C", "2.5.4.9": "STREET", "0.9.2342.19200300.100.1.25": "DC", "0.9.2342.19200300.100.1.1": "UID",
}
# DER string types -> (codec, prefix) for UTF8String, PrintableString, T61String, IA5String,
# UniversalString, BMPString, NumericString, VisibleString. Only codecs Python decodes without
# a lookup (a worker that switched user may not import encodings.*): big-endian UTF-16/32 by BOM.
_STRINGS = {0x0C: ("utf-8", b""), 0x13: ("ascii", b""), 0x14: ("latin-1", b""), 0x16: ("ascii", b""),
            0x1C: ("utf-32", b"\x00\x00\xfe\xff"), 0x1E: ("utf-16", b"\xfe\xff"), 0x12: ("ascii", b""),
            0x1A: ("ascii", b"")}
_SEQUENCE, _SET, _OID = 0x30, 0x31, 0x06

_server_certs: dict[str, str | None] = {}
_cipher_ids: dict[ssl.SSLContext, dict[str, int]] = {}  # a server has one or two contexts


def tls_extension(ssl_object: Any, certfile: str | None) -> dict[str, Any]:
    """The ``tls`` entry of ``scope["extensions"]`` for one TLS connection."""
    chain: list[str] = []
    name = None
    der = ssl_object.getpeercert(binary_form=True)
    if der:
        verified = getattr(ssl_object, "get_verified_chain", None)
        if verified is not None:  # Python 3.13+
            chain = [cert.public_bytes() for cert in verified()]  # PEM by default
        chain = chain or [ssl.DER_cert_to_PEM_cert(der)]
        try:
            name = rfc4514_subject(der)
        except (ValueError, IndexError):  # not DER we can read (UnicodeError is one): unknown
            name = None
    cipher = ssl_object.cipher()
    return {
        "server_cert": server_certificate(certfile),
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": TLS_VERSIONS.get(ssl_object.version()),
        "cipher_suite": cipher_suite(ssl_object.context, cipher[0]) if cipher else None,
    }


def server_certificate(certfile: str | None) -> str | None:
    """The first PEM certificate of ``certfile`` (read once per file), or None."""
    if not certfile:
        return None
    if certfile not in _server_certs:
        try:
            # bytes.decode, not a text file: its codec lookup imports encodings.ascii, which a
            # worker under --user may not be able to read (the stdlib of a private install)
            with open(certfile, "rb") as f:
                text = f.read().decode("ascii", "replace")
        except OSError:
            text = ""
        begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
        start = text.find(begin)
        stop = text.find(end, start)
        _server_certs[certfile] = text[start : stop + len(end)] + "\n" if start >= 0 and stop >= 0 else None
    return _server_certs[certfile]


def cipher_suite(context: ssl.SSLContext, name: str) -> int | None:
    """The IANA number of the cipher suite OpenSSL calls ``name`` (from the context's list)."""
    ids = _cipher_ids.get(context)
    if ids is None:
        ids = _cipher_ids[context] = {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}
    return ids.get(name)


# -- the Subject of a DER certificate, as RFC 4514 writes it ------------------------------------------
def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the DER element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, value start, value end, element start) of each element in data[start:end]."""
    out = []
    while start < end:
        tag, value, stop = _tlv(data, start)
        out.append((tag, value, stop, start))
        start = stop
    return out


def _oid(body: bytes) -> str:
    parts = [body[0] // 40 if body[0] < 80 else 2, body[0] % 40 if body[0] < 80 else body[0] - 80]
    value = 0
    for byte in body[1:]:
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


def _escape(value: str) -> str:
    """RFC 4514 §2.4: escape the specials, a leading '#' or space, a trailing space, NUL."""
    out = "".join("\\" + ch if ch in ',+"\\<>;' else "\\00" if ch == "\0" else ch for ch in value)
    if value[:1] in ("#", " "):
        out = "\\" + out
    if len(value) > 1 and value.endswith(" "):
        out = out[:-1] + "\\ "
    return out


def rfc4514_subject(der: bytes) -> str:
    """The Subject of a DER X.509 certificate as an RFC 4514 string."""
    _, cert, cert_end = _tlv(der, 0)
    _, tbs, tbs_end = _tlv(der, cert)
    fields = _children(der, tbs, tbs_end)
    if fields[0][0] == 0xA0:  # [0] version: present in v2 and v3 certificates
        fields = fields[1:]
    tag, start, end, _ = fields[4]  # serial, signature algorithm, issuer, validity, subject
    if tag != _SEQUENCE:
        raise ValueError("no Subject")
    rdns = []
    for set_tag, set_start, set_end, _ in _children(der, start, end):
        if set_tag != _SET:
            raise ValueError("not an RDN")
        pairs = []
        for _, pair_start, pair_end, _ in _children(der, set_start, set_end):
            (oid_tag, oid_start, oid_end, _), (value_tag, value_start, value_end, element) = _children(der, pair_start, pair_end)[:2]
            if oid_tag != _OID:
                raise ValueError("not an attribute type")
            oid = _oid(der[oid_start:oid_end])
            string = _STRINGS.get(value_tag)
            if oid in SHORT_NAMES and string is not None:
                codec, bom = string
                pairs.append(f"{SHORT_NAMES[oid]}={_escape((bom + der[value_start:value_end]).decode(codec))}")
            else:  # no string form the RFC defines: the BER, in hex
                pairs.append(f"{SHORT_NAMES.get(oid, oid)}=#{der[element:value_end].hex()}")
        rdns.append("+".join(pairs))
    return ",".join(reversed(rdns))
