"""Validated settings plus the objects derived from them.

``Config(app, **settings)`` only validates: every keyword is a setting name from
``uvworker.settings`` and becomes an attribute. ``load()`` does the work that can fail on the
machine it runs on (importing the app, optional packages, TLS files) and raises ``ConfigError``
with a one-sentence message for user mistakes, which the CLI prints as one line. Nothing here
binds a socket or starts anything: ``listen(config)`` in ``uvworker.server`` does that.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from supervisor.sockets import where
from uvworker.core.tls import server_certificate
from uvworker.errors import ConfigError
from uvworker.settings import BY_NAME, SETTINGS

if TYPE_CHECKING:
    from uvworker.interfaces import ASGIApp
    from uvworker.logging import AccessLog
    from uvworker.proxy import TrustedHosts


class Config:
    # Derived by load():
    loaded_app: ASGIApp
    http_parser: str  # "httptools" or "h11"
    loop_factory: Callable[[], asyncio.AbstractEventLoop]
    ssl_context: ssl.SSLContext | None
    serve_h2: bool  # from --http2: asked for, or unset and the h2 package is installed
    default_headers: list[tuple[bytes, bytes]]  # from --header, names lowercased
    forwarded_allow: TrustedHosts  # from --forwarded-allow-ips
    proxy_allow: TrustedHosts  # from --proxy-allow-ips
    access_log_writer: AccessLog | None

    def __init__(self, app: Any, **settings: Any) -> None:
        unknown = sorted(settings.keys() - BY_NAME.keys())
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(unknown)}")
        settings["app"] = app
        for setting in SETTINGS:
            try:
                value = setting.coerce(settings.get(setting.name, setting.default))
            except ValueError as err:
                raise ValueError(f"{setting.name}: {err}") from None
            setattr(self, setting.name, value)
        self.loaded = False

    if TYPE_CHECKING:  # settings are set from the table; this types them for checkers

        def __getattr__(self, name: str) -> Any: ...

    def load(self) -> None:
        """Compute the derived attributes (once)."""
        if self.loaded:
            return
        from uvworker.logging import AccessLog
        from uvworker.proxy import TrustedHosts

        if self.env_file:
            from uvworker.envfile import load_env_file

            load_env_file(self.env_file)  # before the app (and its settings) are imported
        self.http_parser = self._http_parser()
        if self.ws == "websockets":
            _require("websockets", "--ws websockets")
        self.loop_factory = self._loop_factory()
        self.serve_h2 = self._serve_h2()
        self.ssl_context = self._ssl_context()
        self.default_headers = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in self.headers]
        self.forwarded_allow = TrustedHosts(self.forwarded_allow_ips)
        self.proxy_allow = TrustedHosts(self.proxy_allow_ips)
        try:
            self.access_log_writer = AccessLog(self.access_log_format) if self.access_log else None
        except ValueError as err:
            raise ConfigError(str(err)) from err
        self.loaded_app = self._load_app()
        self.loaded = True

    def _http_parser(self) -> str:
        if self.http == "auto":
            return "httptools" if importlib.util.find_spec("httptools") else "h11"
        _require(self.http, f"--http {self.http}")
        return self.http

    def _serve_h2(self) -> bool:
        if self.http2 is None:
            return importlib.util.find_spec("h2") is not None
        if self.http2:
            _require("h2", "--http2")
        return bool(self.http2)

    def _loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop]:
        if self.loop == "uvloop" or (self.loop == "auto" and importlib.util.find_spec("uvloop")):
            return _require("uvloop", f"--loop {self.loop}").new_event_loop
        return asyncio.new_event_loop

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self.ssl_certfile or self.ssl_keyfile):
            return None
        if not self.ssl_certfile:
            raise ConfigError("--ssl-keyfile was given without --ssl-certfile")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self.ssl_version in _ONLY_VERSION:  # the deprecated one-version protocols, as a range
            context.minimum_version = context.maximum_version = _ONLY_VERSION[self.ssl_version]
        # A callable password stops OpenSSL from prompting on the terminal for an encrypted key.
        password = self.ssl_keyfile_password or (lambda: "")
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile, password)
            server_certificate(self.ssl_certfile)  # for the tls extension: read while we can
        except (OSError, ssl.SSLError) as err:
            files = " and ".join(repr(f) for f in (self.ssl_certfile, self.ssl_keyfile) if f)
            raise ConfigError(f"cannot load the TLS certificate and key from {files}: {_reason(err)}") from err
        try:
            if self.ssl_ca_certs:
                context.load_verify_locations(self.ssl_ca_certs)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"cannot load --ssl-ca-certs {self.ssl_ca_certs!r}: {_reason(err)}") from err
        try:
            if self.ssl_ciphers:
                context.set_ciphers(self.ssl_ciphers)
        except ssl.SSLError as err:
            raise ConfigError(f"--ssl-ciphers {self.ssl_ciphers!r} selects no cipher") from err
        context.verify_mode = ssl.VerifyMode(self.ssl_cert_reqs)
        offer_alpn(context, self.serve_h2)
        return context

    def _load_app(self) -> ASGIApp:
        from uvworker.importer import call_factory, import_app
        from uvworker.interfaces import as_asgi3

        name = self.app if isinstance(self.app, str) else repr(self.app)
        app = import_app(self.app, self.app_dir) if isinstance(self.app, str) else self.app
        if self.factory:
            app = call_factory(app, name)
        if not callable(app):
            raise ConfigError(f"the application {name} is a {type(app).__name__}, not a callable")
        return as_asgi3(app, self.interface, self)

    @property
    def bind_name(self) -> str:
        """Where the server listens, for messages."""
        return where(self.host, self.port, self.uds, self.fd)


def offer_alpn(context: ssl.SSLContext, http2: bool) -> None:
    """The protocols TLS clients may choose by ALPN: h2 first when HTTP/2 is served."""
    context.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])


# --ssl-version's ssl.PROTOCOL_TLSv1 / _TLSv1_1 / _TLSv1_2 (3, 4, 5): one TLS version only.
_ONLY_VERSION = {3: ssl.TLSVersion.TLSv1, 4: ssl.TLSVersion.TLSv1_1, 5: ssl.TLSVersion.TLSv1_2}


def _require(module: str, option: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{option} needs the {module} package: pip install 'uvworker[standard]'") from None


def _reason(err: OSError) -> str:
    if isinstance(err, ssl.SSLError):
        if err.reason:  # e.g. KEY_VALUES_MISMATCH
            return err.reason.lower().replace("_", " ")
        return "not a PEM certificate and private key, or a wrong --ssl-keyfile-password"
    return err.strerror or str(err)
