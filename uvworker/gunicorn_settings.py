"""Gunicorn's configuration read as uvworker settings, for the Gunicorn worker classes.

The mapping itself is data: the ``gunicorn`` slot of each row of the settings table
(uvworker/settings.py). This module holds only what the table cannot say:

* which value wins: a Gunicorn setting that is set wins; one left at its default yields to
  ``UVWORKER_<NAME>`` in the environment, which also fills in what Gunicorn has no setting
  for (``--env`` / ``raw_env`` reach it that way);
* how a value is adapted where Gunicorn's meaning differs from uvworker's (``_ADAPT``).

It runs twice: in the arbiter (``Worker.check_config``, before any fork, so that a value we
cannot use stops Gunicorn at once with one line) and in each worker as it boots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from uvworker.errors import ConfigError
from uvworker.settings import BY_NAME, SETTINGS, from_environ

__all__ = ["STANDALONE_ONLY", "settings_from_gunicorn", "standalone_only_set"]

# Gunicorn values whose meaning differs from the uvworker setting they map to.
_ADAPT: dict[str, Callable[[Any], Any]] = {
    "keepalive": float,  # 0 means no keep-alive in both
    "worker_connections": lambda v: v or None,
    # The arbiter SIGKILLs graceful_timeout after its TERM: stop draining a little earlier so
    # that lifespan shutdown still runs.
    "graceful_timeout": lambda v: max(v - 1.0, v * 0.8),
    # Gunicorn's request limits, as its parser applies them (gunicorn/http/message.py), in
    # uvworker's arithmetic. The request line: without its CRLF in both; 0 is unlimited (here
    # 1 MiB, the bound of Gunicorn's C parser), above 8190 it is 8190.
    "limit_request_line": lambda v: min(v, 8190) if v > 0 else 1 << 20,
    "limit_request_fields": lambda v: v if 0 < v <= 32768 else 32768,  # Host included in both
    # A field line: Gunicorn counts its CRLF, uvworker does not. 0 is 8190 (Gunicorn's docs say
    # unlimited; its parser says 8190).
    "limit_request_field_size": lambda v: max((v if v > 0 else 8190) - 2, 1),
    "proxy_protocol": lambda v: v not in (False, None, "off"),  # v1, v2, auto: both accepted
    "cert_reqs": int,
    # Gunicorn's default of 1 thread suits its sync worker; here it would serialise every WSGI
    # request of the worker, so only an explicit --threads above 1 replaces our default.
    "threads": lambda v: v if v > 1 else BY_NAME["wsgi_threads"].default,
    "loglevel": lambda v: v.lower() if v.lower() in BY_NAME["log_level"].choices else "info",
    # h2 listed turns HTTP/2 on; Gunicorn's h1-only default leaves ours (on when h2 is installed).
    "http_protocols": lambda v: True if "h2" in v else None,
}


# Gunicorn settings this worker cannot honour: a value other than Gunicorn's default stops
# Gunicorn at start with the reason, rather than being ignored. Every other Gunicorn setting is
# mapped by the settings table, handed on by the worker (hooks, loggers, TLS, proxy rules) or
# applied by Gunicorn itself; tests/test_gunicorn.py sorts all of them into these groups.
UNSUPPORTED: dict[str, str] = {
    "protocol": "uvworker speaks HTTP only (with nginx: proxy_pass, not uwsgi_pass)",
    "http_parser": "Gunicorn's parsers are not used: uvworker.Worker parses with httptools when installed, "
                   "uvworker.H11Worker with h11",
    "header_map": "header names with '_' are always left out of the WSGI environ (Gunicorn's 'drop')",
    "forwarder_headers": "of the headers a trusted proxy may send with '_' in their names, only SCRIPT_NAME is "
                         "read (Gunicorn's default, SCRIPT_NAME,PATH_INFO)",
    "permit_obsolete_folding": "uvworker's HTTP/1.1 parsers have no such leniency",
    "strip_header_spaces": "uvworker's HTTP/1.1 parsers have no such leniency",
    "permit_unconventional_http_method": "uvworker's HTTP/1.1 parsers have no such leniency",
    "permit_unconventional_http_version": "uvworker's HTTP/1.1 parsers have no such leniency",
    "casefold_http_method": "methods reach the app as the client sent them",
    "http2_initial_window_size": "uvworker sizes its HTTP/2 flow-control windows itself",
    "http2_max_frame_size": "uvworker's HTTP/2 frame size is h2's default",
    "http2_max_header_list_size": "HTTP/2 request heads are bounded by limit_request_fields and "
                                  "limit_request_field_size",
    "asgi_disconnect_grace_period": "an ASGI app is told of a disconnect (http.disconnect) and never "
                                    "cancelled for it",
    "http2_cleartext": "cleartext HTTP/2 is by prior knowledge only, when HTTP/2 is on (no Upgrade: h2c)",
}
# uvworker settings of the standalone server that nothing under Gunicorn serves: the worker
# warns (Worker.check_config) and leaves them out, rather than pay for them in silence.
STANDALONE_ONLY: dict[str, str] = {
    "metrics_bind": "the metrics listener is the standalone server's (uvworker --metrics-bind); "
                    "under Gunicorn use its statsd_host",
}
# Values other than the default that are honoured all the same.
_ACCEPTED: dict[str, tuple[Any, ...]] = {"http2_cleartext": ("prior-knowledge",)}


def standalone_only_set(environ: Mapping[str, str]) -> list[str]:
    """One warning for each STANDALONE_ONLY setting ``environ`` sets (Gunicorn leaves it out)."""
    return [
        f"{BY_NAME[name].env} is ignored: {reason}."
        for name, reason in STANDALONE_ONLY.items()
        if environ.get(BY_NAME[name].env, "").strip()
    ]


def refused(cfg: Any) -> str | None:
    """The line that stops Gunicorn for the first UNSUPPORTED setting set to another value
    than its default, or None."""
    for name, reason in UNSUPPORTED.items():
        source = cfg.settings.get(name)
        if source is None or _at_default(source) or source.get() in _ACCEPTED.get(name, ()):
            continue
        return f"Gunicorn setting {name}={source.get()!r} is not supported by uvworker: {reason}."
    return None


def settings_from_gunicorn(cfg: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    """uvworker settings for a Gunicorn config: every table row with a ``gunicorn`` slot takes
    Gunicorn's value, unless Gunicorn has it at its default and ``UVWORKER_<NAME>`` is set.

    Raises ConfigError naming the Gunicorn setting or variable for a value that does not fit,
    or for an UNSUPPORTED setting that is set.
    """
    line = refused(cfg)
    if line is not None:
        raise ConfigError(line)
    try:
        chosen = from_environ(environ)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    chosen.pop("app", None)  # the application is Gunicorn's to name
    for name in STANDALONE_ONLY:
        chosen.pop(name, None)
    # Gunicorn bounds a head by its three limits only: no 128 KiB bound of our own.
    chosen.setdefault("limit_request_head", 0)
    for setting in SETTINGS:
        source = cfg.settings.get(setting.gunicorn) if setting.gunicorn else None
        if source is None or (setting.name in chosen and _at_default(source)):
            continue
        value = source.get()
        if value is None:
            continue
        try:
            adapt = _ADAPT.get(setting.gunicorn)
            chosen[setting.name] = setting.coerce(adapt(value) if adapt else value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"Gunicorn setting {setting.gunicorn}={value!r} cannot be used: {err}"
            ) from None
    return chosen


def _at_default(source: Any) -> bool:
    try:
        return bool(source.get() == source.validator(source.default))
    except Exception:  # a validator with side effects or needs we do not meet
        return False
