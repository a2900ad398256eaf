"""Run a Config until shutdown: ``uvworker.run(app, **settings)`` and the CLI both end up here."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from uvworker.config import Config
from uvworker.errors import EXIT_OK, EXIT_STARTUP_FAILED, ConfigError, report


def run(app: Any, **settings: Any) -> None:
    """Serve ``app`` (an ASGI app or "module:attribute") until shutdown, like ``uvicorn.run``.

    Invalid settings raise TypeError/ValueError; a failure to start exits the process (1 or 3).
    """
    code = launch(Config(app, **settings))
    if code:
        sys.exit(code)


def launch(config: Config) -> int:
    """Run ``config`` until shutdown and return the process exit code.

    This is the one place that decides how to run: one process, or a supervisor forking
    workers (``uvworker.prefork.wanted``). A mistake in the configuration is one line on
    stderr, with its traceback at --log-level debug.
    """
    from supervisor.config import SupervisorError
    from uvworker.logging import configure_logging, reopen_on_sigusr1
    from uvworker.prefork import supervise, wanted

    try:
        try:
            configure_logging(
                config.log_level, config.log_config, access_logfile=config.access_logfile,
                error_logfile=config.error_logfile, use_colors=config.use_colors,
            )
            reopen_on_sigusr1()
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return supervise(config) if wanted(config) else serve(config)
    except (ConfigError, SupervisorError) as err:
        return report(err, config.log_level == "debug")


def serve(config: Config) -> int:
    """Load the app, listen and serve in this process; the exit code."""
    from uvworker.exporter import close_listener, listener
    from uvworker.logging import reopen_on_sigusr1
    from uvworker.server import Server, listen

    config.load()
    metrics_socket = listener(config)
    try:
        sockets = listen(config)
    except BaseException:
        close_listener(config, metrics_socket)
        raise
    try:
        server = Server(config, metrics_socket=metrics_socket)
        server.run(sockets=sockets)
    finally:
        reopen_on_sigusr1()  # the loop's handler is gone
        close_listener(config, metrics_socket)
        for sock in sockets:
            sock.close()
        if config.uds and config.fd is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.uds)
    return EXIT_STARTUP_FAILED if server.startup_failed else EXIT_OK

