"""The one table of uvworker settings.

Every option is declared here once, and everything else is derived from this table: the
command line (``uvworker.cli``), validation in ``Config(**settings)``, the ``UVWORKER_<NAME>``
environment variables (``from_environ``), the README options table (``python -m
uvworker.settings`` prints it; a test compares) and, through ``Setting.gunicorn``, the Gunicorn
worker's mapping.

A parser turns a string (command line, environment) or a Python value (``Config``) into the
setting's value, or raises ValueError with a short reason ("'abc' is not an integer"); callers
prefix the option's name. Parsing a parsed value returns it unchanged, so values can be
parsed at the edge (CLI, environment) and again by ``Config``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

Parser = Callable[[Any], Any]


def _invalid(value: Any, what: str) -> NoReturn:
    raise ValueError(f"{value!r} is not {what}")


def integer(low: int = 0, high: int | None = None) -> Parser:
    def parse(given: Any) -> int:
        value = given
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                _invalid(given, "an integer")
        if isinstance(value, bool) or not isinstance(value, int):
            _invalid(given, "an integer")
        if value < low or (high is not None and value > high):
            _invalid(given, f"between {low} and {high}" if high is not None else f"at least {low}")
        return value

    return parse


def number(given: Any) -> float:
    """A finite, non-negative number (seconds, rates)."""
    value = given
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            _invalid(given, "a number")
    if isinstance(value, bool) or not isinstance(value, int | float):
        _invalid(given, "a number")
    if not math.isfinite(value) or value < 0:
        _invalid(given, "a finite number of at least 0")
    return float(value)


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
             "0": False, "false": False, "no": False, "off": False}


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    _invalid(value, "a boolean (true/false, yes/no, on/off, 1/0)")


def text(value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        _invalid(value, "a string")
    return value


def text_or_dict(value: Any) -> str | dict[str, Any]:
    """A file name, or (from Python) a configuration dictionary."""
    return value if isinstance(value, dict) else text(value)


def word(value: Any) -> str:
    """Text compared case-insensitively against a setting's choices."""
    return text(value).strip().lower()


def ws_implementation(value: Any) -> str:
    """--ws: uvicorn's name for the websockets sans-I/O implementation is ours too."""
    name = word(value)
    return "websockets" if name == "websockets-sansio" else name


def application(value: Any) -> Any:
    """``module:attribute`` (dotted names on both sides), or the application object itself."""
    if isinstance(value, str):
        module, _, attr = value.partition(":")
        names = module.split(".") + attr.split(".")
        if not all(name.isidentifier() for name in names):
            _invalid(value, "of the form module:attribute")
    elif not callable(value):
        _invalid(value, "an application (module:attribute or a callable)")
    return value


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header(value: Any) -> tuple[str, str]:
    """``NAME:VALUE`` or a (name, value) pair; names are tokens, values single-line latin-1."""
    if isinstance(value, str) and ":" in value:
        value = tuple(value.split(":", 1))
    if not (isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        _invalid(value, "a NAME:VALUE header")
    name, val = value[0].strip(), value[1].strip()
    if not _TOKEN.fullmatch(name) or re.search(r"[\x00-\x08\x0a-\x1f\x7f]", val) or not _latin1(val):
        _invalid(":".join(value), "a valid NAME:VALUE header")
    return name, val


def _latin1(value: str) -> bool:
    return all(ord(c) < 256 for c in value)


def addresses(value: Any) -> str:
    """Comma-separated IP addresses and CIDR networks, or ``*`` for all; also a list of them."""
    items = text(value).split(",") if not isinstance(value, list | tuple) else [text(v) for v in value]
    items = [item.strip() for item in items if item.strip()]
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                _invalid(item, "an IP address, a CIDR network or *")
    return ",".join(items)


def bind(value: Any) -> str:
    """``HOST:PORT`` (``[IPv6]:PORT``) or ``unix:PATH``, checked; ``split_bind`` takes it apart."""
    split_bind(text(value))
    return text(value)


def split_bind(value: str) -> tuple[str, int, str | None]:
    """``bind`` text as (host, port, unix path or None); ValueError when it is neither form."""
    if value.startswith("unix:"):
        if not value[5:]:
            _invalid(value, "unix:PATH with a path")
        return "", 0, value[5:]
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        _invalid(value, "ADDRESS:PORT (e.g. 0.0.0.0:9000) or unix:PATH")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            _invalid(value, "ADDRESS:PORT with an IP address (e.g. 0.0.0.0:9000) or unix:PATH")
    return host, int(port), None


def octal(value: Any) -> int:
    """A file mode mask: octal digits as text (022, 0o022) or an int."""
    if isinstance(value, str):
        try:
            value = int(value.strip().removeprefix("0o"), 8)
        except ValueError:
            _invalid(value, "an octal mask such as 022")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        _invalid(value, "an octal mask such as 022")
    return value


def name_or_id(value: Any) -> str | int:
    """A user or group: a name, or a numeric id."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    value = text(value).strip()
    if not value:
        _invalid(value, "a name or a numeric id")
    return int(value) if value.isdigit() else value


Kind = Literal["value", "flag", "list", "arg"]


@dataclass(frozen=True)
class Setting:
    """One option. ``kind``: value (``--flag VALUE``), flag (``--x``/``--no-x``), list
    (repeatable; one per line in the environment) or arg (positional)."""

    name: str
    default: Any
    parse: Parser
    help: str
    kind: Kind = "value"
    flags: tuple[str, ...] = ()
    choices: tuple[Any, ...] = ()
    metavar: str = "VALUE"
    gunicorn: str | None = None
    also_env: tuple[str, ...] = ()  # read after UVWORKER_<NAME> (e.g. uvicorn's variable)

    def __post_init__(self) -> None:
        if not self.flags and self.kind != "arg":
            object.__setattr__(self, "flags", ("--" + self.name.replace("_", "-"),))
        if self.choices and self.metavar == "VALUE":
            object.__setattr__(self, "metavar", "{" + ",".join(map(str, self.choices)) + "}")

    @property
    def env(self) -> str:
        return "UVWORKER_" + self.name.upper()

    def check(self, value: Any) -> Any:
        """Parse one value (one item of a list setting)."""
        value = self.parse(value)
        if self.choices and value not in self.choices:
            _invalid(value, "one of " + ", ".join(map(str, self.choices)))
        return value

    def coerce(self, value: Any) -> Any:
        """Parse a whole value; None is allowed when it is the default."""
        if value is None and self.default is None:
            return None
        if self.kind == "list":
            if isinstance(value, str):
                value = [line for line in value.splitlines() if line.strip()]
            if not isinstance(value, list | tuple):
                _invalid(value, "a list")
            return [self.check(item) for item in value]
        return self.check(value)


_S = Setting
_SECONDS = {"parse": number, "metavar": "SECONDS"}
_IPS = {"parse": addresses, "metavar": "IPS"}

SETTINGS: tuple[Setting, ...] = (
    _S("app", None, application, "The ASGI application, as module:attribute (e.g. main:app).",
       kind="arg", metavar="APP"),
    _S("factory", False, boolean, "APP is a factory: call it without arguments to get the application.",
       kind="flag"),
    _S("app_dir", ".", text, "Import APP from this directory (put first on sys.path).", metavar="DIR"),
    _S("env_file", None, text, "Load environment variables from this dotenv file (python-dotenv) "
       "before the application is imported; variables already set win. UVWORKER_* settings in "
       "it apply too, below the command line and the environment.", metavar="FILE"),
    _S("host", "127.0.0.1", text, "Listen on this address; 0.0.0.0 or :: for all interfaces.",
       metavar="ADDRESS"),
    _S("port", 8000, integer(0, 65535), "Listen on this TCP port; 0 picks a free one.", metavar="PORT"),
    _S("uds", None, text, "Listen on this Unix domain socket instead of --host/--port.", metavar="PATH"),
    _S("fd", None, integer(0), "Serve on this inherited, bound socket file descriptor (e.g. systemd).",
       metavar="FD"),
    _S("backlog", 2048, integer(1), "Connections the kernel may queue before they are accepted.",
       metavar="N", gunicorn="backlog"),
    _S("http", "auto", word, "HTTP/1.1 parser; auto picks httptools when it is installed.",
       choices=("auto", "httptools", "h11")),
    _S("loop", "auto", word, "Event loop; auto picks uvloop when it is installed.",
       choices=("auto", "uvloop", "asyncio"), gunicorn="asgi_loop"),
    _S("interface", "auto", word, "Application interface; auto detects it (a callable taking "
       "environ, start_response is WSGI).", choices=("auto", "asgi3", "asgi2", "wsgi")),
    _S("wsgi_threads", 10, integer(1), "Threads that run a WSGI application; requests beyond them "
       "wait for a free one.", metavar="N", gunicorn="threads"),
    _S("wsgi_queue", 1000, integer(0), "WSGI requests that may wait for a free thread; beyond this "
       "many a request gets 503 at once (load shedding).", metavar="N"),
    _S("lifespan", "auto", word, "ASGI lifespan events: on requires the app to support them, "
       "auto uses them when it does, off skips them.", choices=("auto", "on", "off"),
       gunicorn="asgi_lifespan"),
    _S("root_path", "", text, "ASGI root_path, for an app mounted below a URL prefix.", metavar="PATH"),
    _S("reset_contextvars", False, boolean, "Run each request's application task (HTTP and "
       "WebSocket) in a fresh, empty contextvars.Context: it sees no context variable set at "
       "import, in the lifespan or by instrumentation.", kind="flag"),
    _S("proxy_headers", True, boolean, "Take the client address and scheme from X-Forwarded-For, "
       "X-Forwarded-Proto and Forwarded when the peer is in --forwarded-allow-ips.", kind="flag"),
    _S("forwarded_allow_ips", "127.0.0.1", help="Comma-separated IPs and CIDR networks trusted to "
       "send proxy headers; * trusts every peer. FORWARDED_ALLOW_IPS is read too.",
       gunicorn="forwarded_allow_ips", also_env=("FORWARDED_ALLOW_IPS",), **_IPS),
    _S("server_header", True, boolean, "Send a Server header.", kind="flag"),
    _S("date_header", True, boolean, "Send a Date header.", kind="flag"),
    _S("headers", (), header, "Add this header to every response; repeatable.",
       kind="list", flags=("--header",), metavar="NAME:VALUE"),
    _S("limit_concurrency", None, integer(1), "Beyond this many requests in flight, answer 503 at "
       "once (load shedding); no limit by default.", metavar="N", gunicorn="worker_connections"),
    _S("limit_request_line", 8190, integer(1), "Longest request line in bytes, as sent, without its "
       "CRLF; longer gets 414.", metavar="BYTES", gunicorn="limit_request_line"),
    _S("limit_request_fields", 100, integer(1), "Most header field lines in a request, Host included "
       "(and, apart, in its trailer); more gets 431.", metavar="N", gunicorn="limit_request_fields"),
    _S("limit_request_field_size", 8190, integer(1), "Longest header field line in bytes, as sent "
       "(name, colon, spaces and value) without its CRLF; longer gets 431.", metavar="BYTES",
       gunicorn="limit_request_field_size"),
    _S("limit_request_head", 128 * 1024, integer(0), "Largest request head in bytes, as sent: request "
       "line, field lines and the empty line, CRLFs included; larger gets 431. The three limits "
       "above bound it too; 0 leaves only them (the default under Gunicorn, as in Gunicorn).",
       metavar="BYTES"),
    _S("h11_max_incomplete_event_size", None, integer(1), "With --http h11: the most bytes of an "
       "incomplete request head (or chunk header) held while it arrives; more gets 431 (414 within "
       "the request line). Default: the head bound (--limit-request-head). httptools ignores it, "
       "as in uvicorn.", metavar="BYTES"),
    _S("timeout_keep_alive", 5.0, help="Close an idle keep-alive connection after this long.",
       gunicorn="keepalive", **_SECONDS),
    _S("timeout_request_header", 10.0, help="Close a connection whose request line and headers take "
       "longer than this to arrive (also a new connection that sends nothing).", **_SECONDS),
    _S("timeout_request_body", 20.0, help="Close a connection whose request body stalls this long "
       "while the application waits for it.", **_SECONDS),
    _S("min_request_body_rate", 500.0, number, "Each RATE bytes of request body received extend "
       "--timeout-request-body by a second, so slow but steady uploads survive; 0 disables.",
       metavar="RATE"),
    _S("timeout_send", 60.0, help="Close a connection whose client has taken none of the response "
       "for this long while the server waits to send more, or to finish sending before it "
       "closes.", **_SECONDS),
    _S("timeout_request", None, number, "End a request whose response is not complete this long "
       "after its head arrived: 504 if nothing was sent yet, else the connection is closed; the "
       "ASGI task is cancelled, a WSGI thread is left to finish (a worker with more such threads "
       "than --wsgi-threads asks to be replaced). WebSockets are exempt. Unset or 0: no limit.",
       metavar="SECONDS"),
    _S("timeout_graceful_shutdown", 30.0, help="On shutdown, wait this long for in-flight requests "
       "to finish before closing their connections.", gunicorn="graceful_timeout", **_SECONDS),
    _S("shutdown_delay", 0.0, help="On SIGTERM, first answer /readyz with 503 and go on accepting "
       "and serving normally for this long (so a load balancer stops sending traffic), then drain "
       "as --timeout-graceful-shutdown says. A second SIGTERM drains at once.", **_SECONDS),
    _S("metrics_bind", None, bind, "Serve /metrics (Prometheus; OpenMetrics when asked), /livez and "
       "/readyz on this separate listener, ADDRESS:PORT or unix:PATH: in the supervisor, with the "
       "totals of every worker past and present, or in the one process. Needs prometheus_client "
       "(pip install 'uvworker[metrics]').", metavar="ADDRESS:PORT"),
    _S("ssl_keyfile", None, text, "TLS private key file (PEM).", metavar="FILE", gunicorn="keyfile"),
    _S("ssl_certfile", None, text, "TLS certificate chain file (PEM); serves HTTPS.", metavar="FILE",
       gunicorn="certfile"),
    _S("ssl_keyfile_password", None, text, "Password of an encrypted --ssl-keyfile.",
       metavar="PASSWORD"),
    _S("ssl_version", 17, integer(0), "TLS protocol, as an ssl.PROTOCOL_* number: 17 (TLS_SERVER) "
       "or 2 (TLS) negotiate the newest version both sides speak; 5, 4 or 3 speak only TLS 1.2, "
       "1.1 or 1.0.", choices=(17, 2, 5, 4, 3)),
    _S("ssl_ca_certs", None, text, "CA certificates file to verify client certificates with.",
       metavar="FILE", gunicorn="ca_certs"),
    _S("ssl_cert_reqs", 0, integer(0), "Client certificates: 0 not asked for, 1 optional, "
       "2 required (ssl.CERT_*).", choices=(0, 1, 2), gunicorn="cert_reqs"),
    _S("ssl_ciphers", None, text, "OpenSSL cipher list (for TLS 1.2 and older); unset, OpenSSL's "
       "default list.", metavar="CIPHERS", gunicorn="ciphers"),
    _S("log_level", "info", word, "Log level; debug also prints tracebacks of startup errors.",
       choices=("critical", "error", "warning", "info", "debug"), gunicorn="loglevel"),
    _S("log_config", None, text_or_dict, "Logging configuration file: .json or .yaml for "
       "logging.dictConfig, anything else for logging.fileConfig (INI); from Python, a dictConfig "
       "dictionary. It wins over --access-logfile/--error-logfile for the loggers it configures.",
       metavar="FILE"),
    _S("access_logfile", None, text, "Write the access log to this file (appending; - is stdout, "
       "the default). Every process writes to it; SIGUSR1 to the server reopens it everywhere. "
       "Under Gunicorn, use its --access-logfile.", metavar="PATH"),
    _S("error_logfile", None, text, "Write the server log to this file (appending; - is stderr, "
       "the default). Every process writes to it; SIGUSR1 to the server reopens it everywhere. "
       "Under Gunicorn, use its --error-logfile.", metavar="PATH"),
    _S("access_log", True, boolean, "Log one line per response to the uvworker.access logger.",
       kind="flag"),
    _S("access_log_format", None, text, "Access log line in Gunicorn atoms, e.g. "
       '\'%(h)s "%(r)s" %(s)s %(b)s %(D)s\', or json for one JSON object per line; the default '
       "has client, time, request line, status, bytes and duration.", metavar="FORMAT",
       gunicorn="access_log_format"),
    _S("use_colors", None, boolean, "Colour the level names of the server log and the status "
       "codes of the access log; unset, only where the log goes to a terminal. Ignored with "
       "--log-config, as in uvicorn.", kind="flag"),
    _S("proxy_protocol", False, boolean, "Expect a PROXY protocol v1/v2 header on each connection "
       "from --proxy-allow-ips peers.", kind="flag", gunicorn="proxy_protocol"),
    _S("proxy_allow_ips", "127.0.0.1", help="Comma-separated IPs and CIDR networks allowed to send "
       "a PROXY protocol header; * allows every peer.", gunicorn="proxy_allow_ips", **_IPS),
    # WebSocket (issue 3).
    _S("ws", "auto", ws_implementation, "WebSocket support: auto uses the websockets package "
       "when it is installed; none serves upgrade requests to the application as plain HTTP. "
       "uvicorn's websockets-sansio is websockets (its sans-I/O protocol is the one used).",
       choices=("auto", "websockets", "none")),
    _S("ws_max_size", 16 * 1024 * 1024, integer(1), "Largest WebSocket message in bytes; a larger "
       "one closes the connection with code 1009.", metavar="BYTES", gunicorn="websocket_max_message_size"),
    _S("ws_max_queue", 32, integer(1), "Received WebSocket messages that may wait for the "
       "application; when this many wait, the server stops reading from that client.", metavar="N"),
    _S("ws_ping_interval", 20.0, help="Send a WebSocket ping this often; 0 disables.", **_SECONDS),
    _S("ws_ping_timeout", 20.0, help="Close a WebSocket with code 1011 when the pong to a ping "
       "takes longer than this; 0 disables.", **_SECONDS),
    _S("ws_per_message_deflate", True, boolean, "Negotiate permessage-deflate compression with "
       "WebSocket clients that offer it.", metavar="BOOL"),
    # HTTP/2 (issue 12).
    _S("http2", None, boolean, "Serve HTTP/2: over TLS when the client offers h2 by ALPN (else "
       "HTTP/1.1), and in cleartext (h2c) to clients that open with the HTTP/2 preface, on the "
       "same port as HTTP/1.1. Unset, on when the h2 package is installed. Under Gunicorn, "
       "http_protocols with h2 turns it on.", kind="flag", gunicorn="http_protocols"),
    _S("http2_max_concurrent_streams", 100, integer(1), "HTTP/2 streams a client may have in "
       "flight on one connection (SETTINGS_MAX_CONCURRENT_STREAMS); more are refused.",
       metavar="N", gunicorn="http2_max_concurrent_streams"),
    # Pre-fork supervisor (issue 6): giving any of these selects supervisor mode (uvworker.prefork).
    _S("workers", None, integer(1), "Worker processes, forked by a supervisor that restarts, reloads "
       "(SIGHUP) and recycles them; unset, one process serves without a supervisor. "
       "WEB_CONCURRENCY is read too.", metavar="N", gunicorn="workers", also_env=("WEB_CONCURRENCY",)),
    _S("max_requests", 0, integer(0), "Replace a worker after it served this many requests (plus at "
       "most one per open connection); its replacement is started ahead of time; 0 never.", flags=("--max-requests", "--limit-max-requests"),
       metavar="N", gunicorn="max_requests"),
    _S("max_requests_jitter", 0, integer(0), "Add a random 0..N to each worker's --max-requests so "
       "workers are not replaced together.", flags=("--max-requests-jitter", "--limit-max-requests-jitter"),
       metavar="N", gunicorn="max_requests_jitter"),
    _S("max_lifetime", 0.0, help="Replace a worker after it served for this long (its replacement "
       "is started ahead of time); 0 never.", **_SECONDS),
    _S("max_lifetime_jitter", 0.0, help="Add a random 0..SECONDS to each worker's --max-lifetime.",
       **_SECONDS),
    _S("max_memory", 0.0, number, "Replace a worker whose USS (the memory only it holds: pages it "
       "shares with other workers or the --preload template do not count) stays above this many "
       "MiB for 3 samples half a second apart (at once above twice as many); 0 never.", metavar="MIB"),
    _S("trace_memory", 0, integer(0, 100), "Trace memory allocations (tracemalloc, FRAMES deep) in each "
       "worker from the moment it serves; SIGUSR2, and recycling by --max-memory, log the 10 "
       "allocation sites that grew most, as file:line. Costs CPU on every allocation; 0 off.",
       metavar="FRAMES"),
    _S("timeout_worker", 30.0, help="A worker that sends no heartbeat for this long is aborted "
       "(stack dump, then killed) and replaced.", flags=("--timeout-worker", "--timeout-worker-healthcheck"),
       gunicorn="timeout", **_SECONDS),
    _S("pid", None, text, "Write the supervisor's process id to this file (refused if it names a "
       "running process; removed on exit).", metavar="FILE", gunicorn="pidfile"),
    _S("user", None, name_or_id, "Run workers as this user (when started as root).", metavar="USER",
       gunicorn="user"),
    _S("group", None, name_or_id, "Run workers as this group (when started as root).",
       metavar="GROUP", gunicorn="group"),
    _S("umask", None, octal, "File mode mask of the server processes, in octal (e.g. 022); it masks the --uds "
       "socket's 0666 too, and the socket belongs to --user/--group (007: for them only).",
       metavar="MASK", gunicorn="umask"),
    _S("preload", False, boolean, "Import the application once, in a template process, and fork "
       "every worker from it: workers share its memory and are ready in milliseconds; SIGHUP "
       "loads the new code in a new template first (Linux). Under Gunicorn, Gunicorn's preload_app.",
       kind="flag",
       gunicorn="preload_app"),
    _S("reload", False, boolean, "Development: restart the workers when source files change.",
       kind="flag", gunicorn="reload"),
    _S("reload_dir", (), text, "Directory to watch with --reload (default: the current one); "
       "repeatable.", kind="list", metavar="DIR"),
    _S("reload_include", (), text, "Glob of files to watch with --reload (default *.py); "
       "repeatable.", kind="list", metavar="GLOB"),
    _S("reload_exclude", (), text, "Glob of files or directories to ignore with --reload "
       "(default: hidden ones, __pycache__, venv, node_modules); repeatable.", kind="list",
       metavar="GLOB"),
    _S("reload_delay", 0.25, help="With --reload, the time between two looks for changed files; "
       "changes within it make one reload.", **_SECONDS),
)

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given in ``environ`` (empty variables count as unset), parsed.

    Raises ValueError naming the variable when a value is invalid.
    """
    found: dict[str, Any] = {}
    for setting in SETTINGS:
        for var in (setting.env, *setting.also_env):
            if environ.get(var, "").strip():
                try:
                    found[setting.name] = setting.coerce(environ[var])
                except ValueError as err:
                    raise ValueError(f"{var}: {err}") from None
                break
    return found


def show(value: Any) -> str:
    """A default value as users type it."""
    if value is None or value == ():
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if value != "" else '""'


def markdown_table() -> str:
    """The README options table."""
    rows = ["| Option | Environment | Default | Gunicorn | Description |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        if s.kind == "arg":
            option = f"`{s.metavar}`"
        elif s.kind == "flag":
            option = ", ".join(f"`{flag}`, `--no-{flag[2:]}`" for flag in s.flags)
        else:
            option = ", ".join(f"`{flag} {s.metavar}`" for flag in s.flags)
        default = f"`{show(s.default)}`" if show(s.default) else ""
        gunicorn = f"`{s.gunicorn}`" if s.gunicorn else ""
        cells = [option, f"`{s.env}`", default, gunicorn, s.help.replace("|", "\\|")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
