"""The errors users and clients see, and the process exit codes: each defined once, here.

    ConfigError          a user's mistake in the configuration: one line on stderr, exit 1
    AppImportError       the application cannot be imported or built (a ConfigError)
    HTTPError            request bytes we refuse: answered with its status, then the close
    ClientDisconnected   raised by the app's send() (and WSGI reads) once the client has gone

Exit codes of ``uvworker`` (standalone; Gunicorn has its own): 0 after a clean stop, 1 for a
configuration error, 2 for an invalid option, 3 when startup fails (lifespan startup, or
workers that keep dying before they are ready). The supervisor's codes are the same numbers,
and they are defined once, in ``supervisor.config``.
"""

from __future__ import annotations

import sys
import traceback

from supervisor.config import EXIT_ERROR, EXIT_OK, EXIT_STARTUP_FAILED

__all__ = [
    "AppImportError", "ClientDisconnected", "ConfigError", "HTTPError", "REQUEST_TIMEOUT",
    "EXIT_OK", "EXIT_CONFIG_ERROR", "EXIT_USAGE", "EXIT_STARTUP_FAILED", "report",
]

EXIT_CONFIG_ERROR = EXIT_ERROR
EXIT_USAGE = 2


class ConfigError(Exception):
    """A user mistake found while loading the configuration; the message is one sentence."""


class AppImportError(ConfigError):
    """The application could not be imported or built."""


class HTTPError(Exception):
    """Input we refuse: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientDisconnected(OSError):
    """Raised by ``send()`` once the client has gone (ASGI spec 2.4)."""


# The message an app's task is cancelled with when --timeout-request ends its request. An
# adapter whose work cannot be cancelled (a WSGI thread) keeps the task until that work ends,
# so the server sees it still running (``ServerState.abandoned``).
REQUEST_TIMEOUT = "request timeout"


def report(err: Exception, debug: bool = False) -> int:
    """A user's mistake: one line on stderr (the traceback too when ``debug``); the exit code."""
    # One write: a worker's line is not split by another process's log line (print() writes
    # the newline apart, and the supervisor's workers share stderr).
    sys.stderr.write(f"uvworker: error: {err}\n")
    if debug:
        traceback.print_exception(err)
    return EXIT_CONFIG_ERROR
