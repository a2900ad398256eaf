"""Logging: the default set-up, the access log (Gunicorn atoms or JSON), and log reopening.

Two loggers: "uvworker.error" for the server's own messages (stderr, or --error-logfile) and
"uvworker.access" for one line per response (stdout, or --access-logfile; message only: the
access format carries its own timestamp, as Gunicorn's does). Every process of the server
writes to the same files, each through its own descriptor opened for appending, one write per
record; SIGUSR1 makes each process reopen them (``reopen_files``), which is what logrotate's
postrotate sends to the master, and the master passes it on to its workers.

Access-log atoms (Gunicorn's):
    h remote address   l '-'              u basic-auth user   t [dd/Mon/yyyy:HH:MM:SS +zzzz]
    r request line     m method           U path              q query string
    H protocol         s status           B body bytes        b body bytes, '-' when none
    f referer          a user agent       T seconds           D microseconds
    M milliseconds     L decimal seconds  p <pid>
    {name}i request header   {name}o response header   {name}e environment variable
(under Gunicorn, as Gunicorn reads it: the request's WSGI environ key, in any case)
Unknown atoms and missing headers read as '-'. The access log is on the hot path, so an
AccessLog parses its format once, and per request computes only the atoms that format uses —
and nothing at all while the access logger is disabled.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import logging.config
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote

error_logger = logging.getLogger("uvworker.error")
access_logger = logging.getLogger("uvworker.access")

DEFAULT_ACCESS_FORMAT = '%(h)s - %(t)s "%(r)s" %(s)s %(b)s %(L)ss'

ERROR_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"


def default_config(
    access_logfile: str | None = None, error_logfile: str | None = None, use_colors: bool | None = None
) -> dict[str, Any]:
    """The dictConfig set-up used without --log-config: the server log to stderr and the access
    log to stdout, or each to its file (``-`` is the standard stream)."""
    error = _handler(error_logfile, "ext://sys.stderr", "default")
    access = _handler(access_logfile, "ext://sys.stdout", "access")
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"()": f"{__name__}.ColourFormatter", "fmt": ERROR_FORMAT,
                        "colours": _colours(use_colors, error_logfile, sys.stderr)},
            "access": {"format": "%(message)s"},
        },
        "handlers": {"default": error, "access": access},
        "loggers": {
            "uvworker.error": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvworker.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def _handler(path: str | None, stream: str, formatter: str) -> dict[str, Any]:
    if path is None or path == "-":
        return {"class": "logging.StreamHandler", "formatter": formatter, "stream": stream}
    return {"class": "logging.FileHandler", "formatter": formatter, "filename": path, "encoding": "utf-8"}


def _colours(use_colors: bool | None, path: str | None, stream: Any) -> bool:
    """--use-colors forces colours on, --no-use-colors off; unset, a terminal gets them."""
    if use_colors is not None:
        return use_colors
    return (path is None or path == "-") and stream is not None and stream.isatty()


def _check_writable(path: str | None, option: str) -> None:
    if path is not None and path != "-":
        try:
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as err:
            raise ValueError(f"Cannot open the {option} {path!r}: {err.strerror or err}.") from None


# Whether AccessLog colours the status code: decided by configure_logging (--use-colors and
# whether the access log goes to a terminal); AccessLog reads it when it is built.
_access_colours = False


def configure_logging(
    log_level: str | None = None,
    log_config: str | dict[str, Any] | None = None,
    *,
    access_logfile: str | None = None,
    error_logfile: str | None = None,
    use_colors: bool | None = None,
) -> None:
    """Install the logging set-up; then set ``log_level`` on both uvworker loggers (None keeps
    the levels the configuration gives).

    Without ``log_config``: the default set-up, writing to ``access_logfile`` and
    ``error_logfile`` when given. With it (a dictConfig dict, a .json or .yaml dictConfig file,
    or a fileConfig .ini file): the user's configuration wins for every uvworker logger it
    gives handlers to; a log file option still applies to a uvworker logger it leaves without
    handlers (and is reported as unused otherwise), as Gunicorn combines ``--log-config`` with
    its ``--access-logfile``/``--error-logfile``. ``use_colors`` only changes the default
    set-up.
    """
    global _access_colours
    level = None
    if log_level is not None:
        level = logging.getLevelName(log_level.upper())
        if not isinstance(level, int):
            raise ValueError(
                f"Unknown log level {log_level!r}; use critical, error, warning, info or debug."
            )
    if isinstance(log_config, str) and not os.path.isfile(log_config):
        raise ValueError(f"The log config file {log_config!r} does not exist.")
    _check_writable(access_logfile, "--access-logfile")
    _check_writable(error_logfile, "--error-logfile")
    try:
        if log_config is None:
            logging.config.dictConfig(default_config(access_logfile, error_logfile, use_colors))
        else:
            _load(log_config)
    except Exception as exc:
        source = f"file {log_config!r}" if isinstance(log_config, str) else "dictionary"
        raise ValueError(
            f"Cannot load the log config {source} ({type(exc).__name__}: {exc})."
        ) from exc
    _access_colours = log_config is None and _colours(use_colors, access_logfile, sys.stdout)
    if log_config is not None:
        _fill_in(access_logger, access_logfile, sys.stdout, "access", "--access-logfile")
        _fill_in(error_logger, error_logfile, sys.stderr, ERROR_FORMAT, "--error-logfile")
    if level is not None:
        error_logger.setLevel(level)
        access_logger.setLevel(level)


def _load(log_config: str | dict[str, Any]) -> None:
    if isinstance(log_config, dict):
        logging.config.dictConfig(log_config)
    elif log_config.endswith(".json"):
        with open(log_config, encoding="utf-8") as file:
            logging.config.dictConfig(json.load(file))
    elif log_config.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ValueError("a .yaml log config needs PyYAML: pip install 'uvworker[standard]'") from None
        with open(log_config, encoding="utf-8") as file:
            logging.config.dictConfig(yaml.safe_load(file))
    else:
        logging.config.fileConfig(log_config, disable_existing_loggers=False)


def _fill_in(logger: logging.Logger, path: str | None, stream: Any, fmt: str, option: str) -> None:
    """A log file option next to --log-config: used for a uvworker logger the config left alone."""
    if path is None:
        return
    if logger.handlers or logger.disabled:
        error_logger.warning("%s %s is not used: the log config configures the %s logger.", option, path, logger.name)
        return
    handler = logging.StreamHandler(stream) if path == "-" else logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s" if fmt == "access" else fmt))
    logger.addHandler(handler)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


_ESC = "\x1b[{}m{}\x1b[0m"
_LEVEL_COLOURS = {logging.DEBUG: 36, logging.INFO: 32, logging.WARNING: 33, logging.ERROR: 31, logging.CRITICAL: 91}
_STATUS_COLOURS = {1: 97, 2: 32, 3: 33, 4: 31, 5: 91}  # by status class


class ColourFormatter(logging.Formatter):
    """The server log's formatter; with ``colours``, level names are in ANSI colours."""

    def __init__(
        self, fmt: str | None = None, datefmt: str | None = None, style: Any = "%", colours: bool = False
    ) -> None:
        super().__init__(fmt, datefmt, style)
        self.colours = colours

    def formatMessage(self, record: logging.LogRecord) -> str:
        if self.colours and record.levelno in _LEVEL_COLOURS:
            record = copy.copy(record)  # other handlers of the record see it plain
            record.levelname = _ESC.format(_LEVEL_COLOURS[record.levelno], record.levelname)
        return super().formatMessage(record)


def _file_handlers() -> list[logging.FileHandler]:
    """Every FileHandler attached to a logger, once each."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.FileHandler] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):  # placeholders have none
            if isinstance(handler, logging.FileHandler):
                found.setdefault(id(handler), handler)
    return list(found.values())


def reopen_files() -> None:
    """Reopen every log file a logging.FileHandler writes to: after logrotate moved the files
    away, on SIGUSR1, in every process.

    The new file is put under the stream's own file descriptor with ``dup2``, which is atomic,
    and the stream is flushed first under the handler's lock: a record goes whole to the old
    file or to the new one, even when this runs in a signal handler that interrupted emit().
    Existing files are appended to (never truncated). A file that cannot be opened is logged
    and its handler keeps writing where it did.
    """
    failed = []
    for handler in _file_handlers():
        handler.acquire()
        try:
            stream = handler.stream
            if stream is None or stream.closed:
                continue  # delay=True and not written yet: it opens the path when it is
            try:
                stream.flush()
                fd = os.open(handler.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                failed.append((handler.baseFilename, err.strerror or str(err)))
                continue
            try:
                os.dup2(fd, stream.fileno(), inheritable=False)
            finally:
                os.close(fd)
        finally:
            handler.release()
    for path, reason in failed:
        error_logger.error("Cannot reopen the log file %r: %s; still writing to the old one.", path, reason)


def reopen_on_sigusr1() -> None:
    """Make SIGUSR1 reopen the log files in this process while no event loop handles it (while
    the app is imported, after the loop has closed): its default action would end the process
    when logrotate signals at that moment. Safe in a signal handler (see ``reopen_files``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: reopen_files())


class _Exchange(NamedTuple):
    scope: dict[str, Any]
    status: int
    response_headers: list[tuple[bytes, bytes]]
    body_bytes: int
    start_time: float
    duration: float
    environ: dict[str, Any] | None = None  # the request's environ, keys lowercased ({name}e)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes, default: Any = "-") -> Any:
    """The first value of header ``name`` (lowercase), decoded, or ``default``."""
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return default


def _user(headers: list[tuple[bytes, bytes]]) -> str:
    scheme, _, credentials = _header(headers, b"authorization").partition(" ")
    if scheme.lower() != "basic":
        return "-"
    try:
        user = base64.b64decode(credentials, validate=True).decode("utf-8").partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return "-"
    return user or "-"


# HTTP/2 as Gunicorn's atoms (its SERVER_PROTOCOL) name it; the scope's http_version is "2".
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2.0"}


def _protocol(scope: dict[str, Any]) -> str:
    version = scope.get("http_version", "1.1")
    return _PROTOCOLS.get(version) or f"HTTP/{version}"


def _target(scope: dict[str, Any]) -> str:
    """The request target as sent: raw path plus query string."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(scope.get("path", "/"))
    query = scope.get("query_string")
    return f"{path}?{query.decode('latin-1')}" if query else path


def _micros(x: _Exchange) -> int:
    """The duration in whole microseconds; the coarser atoms truncate this (0.029 s is 29 ms,
    which truncating the float product would make 28)."""
    return round(x.duration * 1_000_000)


@lru_cache(maxsize=2)  # a busy server logs many lines per second: format each second once
def _clf_time(second: int) -> str:
    return time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))


_ATOMS: dict[str, Callable[[_Exchange], Any]] = {
    "h": lambda x: x.scope["client"][0] if x.scope.get("client") else "-",
    "l": lambda x: "-",
    "u": lambda x: _user(x.scope["headers"]),
    "t": lambda x: _clf_time(int(x.start_time)),
    "r": lambda x: f"{x.scope.get('method', 'GET')} {_target(x.scope)} {_protocol(x.scope)}",
    "m": lambda x: x.scope.get("method", "GET"),
    "U": lambda x: x.scope.get("path", "/"),
    "q": lambda x: x.scope.get("query_string", b"").decode("latin-1"),
    "H": lambda x: _protocol(x.scope),
    "s": lambda x: x.status,
    "B": lambda x: x.body_bytes,
    "b": lambda x: x.body_bytes or "-",
    "f": lambda x: _header(x.scope["headers"], b"referer"),
    "a": lambda x: _header(x.scope["headers"], b"user-agent"),
    "T": lambda x: _micros(x) // 1_000_000,
    "D": _micros,
    "M": lambda x: _micros(x) // 1_000,
    "L": lambda x: "%d.%06d" % divmod(_micros(x), 1_000_000),
    "p": lambda x: f"<{os.getpid()}>",
}

def _status_in_colour(x: _Exchange) -> str:
    return _ESC.format(_STATUS_COLOURS.get(x.status // 100, 0), x.status)


_FORMAT_KEY = re.compile(r"%\(([^)]*)\)")
_NAMED_ATOM = re.compile(r"\{([^}]+)\}([ioe])")


def _atom_getter(key: str, environ: bool = False) -> Callable[[_Exchange], Any]:
    if key in _ATOMS:
        return _ATOMS[key]
    match = _NAMED_ATOM.fullmatch(key)
    if match is None:
        return lambda x: "-"
    name, kind = match.groups()
    if kind == "e":
        if environ:
            key = name.lower()
            return lambda x: x.environ.get(key, "-")  # type: ignore[union-attr]
        return lambda x: os.environ.get(name, "-")
    lower = name.lower().encode("latin-1")
    if kind == "i":
        return lambda x: _header(x.scope["headers"], lower)
    return lambda x: _header(((k.lower(), v) for k, v in x.response_headers), lower)


def atoms(
    scope: dict[str, Any],
    status: int,
    response_headers: list[tuple[bytes, bytes]],
    body_bytes: int,
    start_time: float,
    duration: float,
) -> dict[str, Any]:
    """Every Gunicorn atom for one exchange: the one-letter atoms, plus '{name}i' for each
    request header and '{name}o' for each response header (names lowercased; for a repeated
    header, its first value). Values are not escaped. To format a user's format with it, wrap
    it in a mapping that reads other keys as '-' (Gunicorn's ``SafeAtoms`` does both)."""
    x = _Exchange(scope, status, response_headers, body_bytes, start_time, duration)
    values = {key: get(x) for key, get in _ATOMS.items()}
    for headers, suffix in ((scope["headers"], "i"), (response_headers, "o")):
        values.update(
            (f"{{{k.decode('latin-1').lower()}}}{suffix}", v.decode("latin-1"))
            for k, v in reversed(headers)
        )
    return values


def _json_line(x: _Exchange) -> str:
    scope, headers = x.scope, x.scope["headers"]
    client = scope.get("client")
    start = datetime.fromtimestamp(x.start_time).astimezone()
    return json.dumps(
        {
            "time": start.isoformat(timespec="milliseconds"),
            "client": client[0] if client else None,
            "method": scope.get("method", "GET"),
            "path": scope.get("path", "/"),
            "query": scope.get("query_string", b"").decode("latin-1"),
            "protocol": _protocol(scope),
            "status": x.status,
            "bytes": x.body_bytes,
            "duration_ms": round(x.duration * 1_000, 3),
            "referer": _header(headers, b"referer", None),
            "user_agent": _header(headers, b"user-agent", None),
        }
    )


_SAMPLE_SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "GET",
    "path": "/",
    "raw_path": b"/",
    "query_string": b"",
    "http_version": "1.1",
    "headers": [],
    "client": ("127.0.0.1", 1),
}


class AccessLog:
    """Writes one line per finished response to the "uvworker.access" logger at INFO.

    ``fmt`` is a Gunicorn-style format (see the module docstring), "json" for one JSON object
    per line, or None for ``DEFAULT_ACCESS_FORMAT``. A format that cannot be rendered raises
    ValueError. In text formats double quotes inside values are escaped, so a quoted field
    stays one field whatever the client sends.

    ``environ(scope)``, if given, is the request's environ that '{name}e' atoms read (as
    Gunicorn's do: the WSGI environ, keys in any case), instead of the process environment.
    It is called once per line, and only for a format that has such an atom.
    """

    def __init__(self, fmt: str | None = None, environ: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.fmt = fmt or DEFAULT_ACCESS_FORMAT
        self._json = self.fmt == "json"
        keys = dict.fromkeys(_FORMAT_KEY.findall(self.fmt))
        self._plan = [(key, _atom_getter(key, environ is not None)) for key in keys]
        uses_environ = any(match and match.group(2) == "e" for match in map(_NAMED_ATOM.fullmatch, keys))
        self.environ = environ if uses_environ and not self._json else None
        # --use-colors: the status in its class's colour, where the format prints it as text.
        if _access_colours and not self._json and self.fmt.count("%(s)s") == self.fmt.count("%(s)"):
            self._plan = [(key, _status_in_colour if key == "s" else get) for key, get in self._plan]
        try:
            self.render(_SAMPLE_SCOPE, 200, [], 0, 0.0, 0.0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"The access log format {self.fmt!r} is invalid: {exc}.") from exc

    def render(
        self,
        scope: dict[str, Any],
        status: int,
        response_headers: list[tuple[bytes, bytes]],
        body_bytes: int,
        start_time: float,
        duration: float,
    ) -> str:
        """The access-log line for one exchange (arguments as for ``log``)."""
        environ = self.environ
        lowered = {key.lower(): value for key, value in environ(scope).items()} if environ is not None else None
        x = _Exchange(scope, status, response_headers, body_bytes, start_time, duration, lowered)
        if self._json:
            return _json_line(x)
        values = {}
        for key, get in self._plan:
            value = get(x)
            values[key] = value.replace('"', '\\"') if value.__class__ is str else value
        return self.fmt % values

    def log(
        self,
        scope: dict[str, Any],
        status: int,
        response_headers: list[tuple[bytes, bytes]],
        body_bytes: int,
        start_time: float,
        duration: float,
    ) -> None:
        """Log one exchange: ``scope`` is its ASGI http scope, ``start_time`` the time.time()
        when the request began, ``duration`` in seconds, ``body_bytes`` the response body
        size."""
        if access_logger.isEnabledFor(logging.INFO):
            access_logger.info(
                self.render(scope, status, response_headers, body_bytes, start_time, duration)
            )
