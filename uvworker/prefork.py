"""uvworker under the pre-fork supervisor: the composition of ``supervisor`` and ``Server``.

The supervisor knows nothing of HTTP; this module is the only place the two meet:

- ``supervise(config)``: the master. It binds the sockets once (or takes systemd's), maps the
  settings onto ``SupervisorConfig`` and runs the supervisor loop. It never imports the
  application: with ``--preload``, ``preload_app`` does, in the supervisor's template process
  (``supervisor.forkserver``), and the workers are forked from it.
- ``serve_worker(config, context)``: the worker target, in each forked child. It imports the
  app (after fork, so a reload picks up new code; with --preload the template already did),
  runs ``Server`` on the inherited sockets (lifespan startup in each worker, as without
  --preload: the template runs no event loop) and
  wires the channel: ``on_ready`` → ``ready``; ``on_tick`` → ``heartbeat`` with the requests
  served (and ``retiring`` once the server is draining); SIGABRT from the master (no
  heartbeat) logs the requests in flight next to the stacks (``uvworker.inflight``).

Recycling by --max-requests and --max-lifetime is kept exactly (``supervisor.budget``): a
request hook counts the requests done and asks the master for a replacement (``nearing``)
ahead of time; at the limit (or the lifetime's end) the worker stops accepting, and every
connection answers its current or next request with ``Connection: close``. Handed over (the
replacement is ready) it retires (``Server.retire()``); not yet, it holds (``Server.hold()``,
``holding`` to the master) until the master retires it, or tells it to serve on
(``SERVE_ON_SIGNAL``: the replacement could not start) and it accepts again
(``Server.resume()``). Any other retirement comes from the master as SIGHUP (the others go on
serving: idle keep-alive connections stay open until their next request); SIGTERM means the
whole server stops, so idle connections are closed at once. Both are graceful (a second TERM
does not force a quick stop: the master has its own deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Mapping
from types import FrameType
from typing import TYPE_CHECKING

from supervisor.config import DEFAULT_RELOAD_EXCLUDE, DEFAULT_RELOAD_INCLUDE, SupervisorConfig
from uvworker.config import Config
from uvworker.errors import EXIT_OK, EXIT_STARTUP_FAILED, ConfigError, report
from uvworker.metrics import COUNTER_FIELDS

if TYPE_CHECKING:
    from supervisor.child import WorkerContext
    from uvworker.settings import Setting
    from uvworker.protocols.cycle import RequestCycle
    from uvworker.server import ServerState

logger = logging.getLogger("uvworker.error")


# Settings that only the supervisor acts on: giving any of them (a value other than its default)
# selects supervisor mode, as does --workers (even 1: one supervised, restarted worker).
SUPERVISOR_SETTINGS = (
    "max_requests", "max_requests_jitter", "max_lifetime", "max_lifetime_jitter", "max_memory",
    "timeout_worker", "pid", "user", "group", "umask", "preload", "reload", "reload_dir",
    "reload_include", "reload_exclude",
)


def wanted(config: Config, environ: Mapping[str, str] | None = None) -> bool:
    """Supervisor mode: --workers given, any other supervisor option, or systemd.

    Under systemd (``$NOTIFY_SOCKET`` or socket activation) the supervisor is used even for one
    worker, because it is what speaks the notify protocol and adopts activated sockets.
    """
    from uvworker.settings import BY_NAME

    env = os.environ if environ is None else environ
    given = any(_given(config, BY_NAME[name]) for name in SUPERVISOR_SETTINGS)
    return config.workers is not None or given or bool(env.get("NOTIFY_SOCKET") or env.get("LISTEN_FDS"))


def _given(config: Config, setting: Setting) -> bool:
    value = getattr(config, setting.name)
    if setting.kind == "list":
        return bool(value)
    return value != setting.default


def supervisor_config(config: Config) -> SupervisorConfig:
    app = config.app if isinstance(config.app, str) else getattr(config.app, "__qualname__", "app")
    return SupervisorConfig(
        workers=config.workers,
        timeout_worker=config.timeout_worker,
        startup_timeout=max(60.0, config.timeout_worker),
        graceful_timeout=config.timeout_graceful_shutdown,
        max_requests=config.max_requests,
        max_requests_jitter=config.max_requests_jitter,
        max_lifetime=config.max_lifetime,
        max_lifetime_jitter=config.max_lifetime_jitter,
        max_memory=config.max_memory,
        memory_interval=0.5,
        pidfile=config.pid,
        user=config.user,
        group=config.group,
        umask=config.umask,
        reload=config.reload,
        reload_dirs=list(config.reload_dir),
        reload_include=DEFAULT_RELOAD_INCLUDE + list(config.reload_include),
        reload_exclude=DEFAULT_RELOAD_EXCLUDE + list(config.reload_exclude),
        reload_interval=config.reload_delay,
        proc_name="uvworker",
        label=str(app),
        reopen_logs=_reopen_logs,
        preload=functools.partial(preload_app, config) if config.preload else None,
        shutdown_delay=config.shutdown_delay,
        counter_fields=COUNTER_FIELDS if config.metrics_bind else (),
    )


def preload_app(config: Config) -> int:
    """In the template process: import the application once (0), or report why not (its code)."""
    try:
        config.load()
    except ConfigError as err:
        return report(err, config.log_level == "debug")
    return EXIT_OK


def _reopen_logs() -> None:
    from uvworker.logging import reopen_files

    reopen_files()


def supervise(config: Config) -> int:
    """Run the master until it stops; its exit code (0, or 3 for a crash loop at startup).

    Raises ConfigError or SupervisorError for mistakes the caller reports as one line.
    """
    from supervisor.master import run
    from supervisor.sockets import systemd_listeners
    from uvworker.exporter import close_listener, listener
    from uvworker.server import listen
    from uvworker.warm_imports import warm_imports

    settings = supervisor_config(config)
    if config.umask is not None:
        os.umask(config.umask)  # before binding: it applies to a --uds socket file
    listeners = systemd_listeners()
    own_uds = False
    if listeners:
        sockets = [listener.sock for listener in listeners]
        logger.info("Using %d socket(s) from systemd: %s", len(listeners),
                    ", ".join(f"{l.name} ({l.describe()})" for l in listeners))
    else:
        sockets = listen(config)
        own_uds = bool(config.uds and config.fd is None)
        if own_uds:
            _give_socket(config)
    metrics_socket = None
    try:
        metrics_socket = listener(config)
        if metrics_socket is not None:
            from uvworker.exporter import MasterEndpoint

            settings.services.append(MasterEndpoint(metrics_socket))
        warm_imports(config)
        return run(functools.partial(serve_worker, config), sockets, settings, logger=logger)
    finally:
        close_listener(config, metrics_socket)
        for sock in sockets:
            sock.close()
        if own_uds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.uds)


def _give_socket(config: Config) -> None:
    """The --uds socket belongs to --user/--group (a mistake in them is the master's to report)."""
    from supervisor import privileges
    from supervisor.config import SupervisorError

    assert config.uds is not None
    try:
        privileges.give(config.uds, privileges.resolve(config.user, config.group))
    except SupervisorError:
        pass


def serve_worker(config: Config, context: WorkerContext) -> int:
    """The worker target: serve until the master retires or stops us; the exit code."""
    from supervisor.budget import EXHAUSTED, HOLD, NEARING, RESUME, Budget, lead_time
    from supervisor.child import HANDOVER_SIGNAL, SERVE_ON_SIGNAL
    from uvworker.inflight import Watchdog, hung_report, on_abort, watchdog_delay
    from uvworker.logging import reopen_on_sigusr1
    from uvworker.server import Server

    reopen_on_sigusr1()
    try:
        config.load()
    except ConfigError as err:
        return report(err, config.log_level == "debug")
    channel = context.channel
    budget: Budget | None = None
    state: ServerState | None = None
    said_retiring = False

    def leave(reason: str | None = None, close_idle: bool = False) -> None:
        """Stop accepting now, gracefully; the master hears it first, so it sends no TERM on top."""
        nonlocal said_retiring
        if not said_retiring:
            said_retiring = True
            channel.retiring(reason)
        server.retire(close_idle)

    def decide(decision: str | None, served: int) -> None:
        if decision is None or budget is None:
            return
        if decision == NEARING:
            channel.nearing(served, budget.eta)
        elif decision == HOLD:
            server.hold()
            channel.holding(served, budget.spent or "")
        elif decision == RESUME:
            server.resume()
        elif decision == EXHAUSTED:
            leave(budget.spent)

    def on_request(cycle: RequestCycle) -> None:
        served = state.requests_served  # type: ignore[union-attr]  # hooks run once ready
        if budget is not None and served >= budget.check_at:
            decide(budget.update(served, time.monotonic()), served)

    def on_handover() -> None:
        if budget is not None:
            decide(budget.hand_over(server.requests_served), server.requests_served)

    def on_serve_on() -> None:
        if budget is not None:
            decide(budget.serve_on(), server.requests_served)

    def on_lifetime() -> None:
        if budget is not None:
            decide(budget.expire(), server.requests_served)

    def on_ready() -> None:
        nonlocal budget, state
        assert server.state is not None
        state = server.state
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, leave)  # retire: the others go on serving
        loop.add_signal_handler(signal.SIGTERM, leave, None, True)  # the whole server stops
        if context.requests_limit or context.lifetime_limit:
            now = time.monotonic()
            own_boot = now - context.spawned_at if context.spawned_at else 0.0
            lead = lead_time(own_boot, context.boot_estimate)
            budget = Budget(context.requests_limit, lead, now, context.rate_estimate)
            if context.requests_limit:
                state.request_hooks.append(on_request)
            if context.lifetime_limit:
                loop.call_later(context.lifetime_limit, on_lifetime)
            loop.add_signal_handler(HANDOVER_SIGNAL, on_handover)
            loop.add_signal_handler(SERVE_ON_SIGNAL, on_serve_on)
        channel.ready()
        watchdog.start()  # after "ready": a thread's start waits for it to run, on a busy CPU too

    def on_tick(srv: Server) -> None:
        nonlocal said_retiring
        served = srv.requests_served
        if not channel.heartbeat(served, **metrics_fields(srv)):
            if not srv.should_exit:
                logger.warning("The supervisor is gone; worker %d stops.", context.number)
                srv.should_exit = True
        elif srv.should_exit:
            if not said_retiring:
                said_retiring = True
                channel.retiring()
        elif budget is not None and served < budget.limit:
            decide(budget.update(served, time.monotonic()), served)  # the rate, also when idle

    def report_hung(signum: int, frame: FrameType | None) -> None:
        # SIGABRT from the master: no heartbeat. faulthandler has written the stacks.
        logger.critical("Worker %d aborted (pid %d); %s", context.number, os.getpid(), hung_report(server.state, frame))
        signal.signal(signal.SIGABRT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGABRT)  # die of it, as without this report

    def metrics_fields(srv: Server) -> dict[str, str]:
        return srv.state.metrics_fields() if srv.state is not None else {}

    server = Server(config, on_ready=on_ready, on_tick=on_tick, on_stuck=lambda: leave("hung"),
                    install_signal_handlers=True)
    on_abort(report_hung)
    # Half the heartbeat timeout: the report comes before the master's SIGABRT and SIGKILL.
    watchdog = Watchdog(lambda: server.state, watchdog_delay(config.timeout_worker), logger.critical)
    server.run(sockets=context.sockets)
    watchdog.stop()
    reopen_on_sigusr1()  # the loop's handler is gone; the final heartbeat and exit remain
    channel.heartbeat(server.requests_served, **metrics_fields(server))  # the final count, for the master's totals
    return EXIT_STARTUP_FAILED if server.startup_failed else EXIT_OK
