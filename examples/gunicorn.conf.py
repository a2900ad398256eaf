"""A production Gunicorn configuration for uvworker.

    gunicorn -c examples/gunicorn.conf.py main:app

Gunicorn manages the processes (sockets, forking, restarts, reloads on SIGHUP); every worker
runs uvworker's engine, and the settings below reach it (see "Running under Gunicorn" in the
README). Values come from the environment where deployments usually vary them.
"""

import os

worker_class = "uvworker.Worker"  # httptools + uvloop; "uvworker.H11Worker" for pure Python
bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
backlog = 2048

# Load shedding: beyond this many requests in flight a worker answers 503 at once, so a
# saturated worker fails fast instead of queueing requests until they time out.
worker_connections = 1000

# Idle keep-alive connections close after this long. Behind a load balancer that reuses
# connections, make it longer than the balancer's own idle timeout (AWS ALB: 60 s -> 65).
keepalive = 5

# The event loop sends the heartbeat: a worker whose loop is blocked this long (CPU-bound or
# blocking code in an async view) gets its stacks logged, worker_abort called, and is replaced.
timeout = 30

# SIGTERM (deploys, scale-down): stop accepting, finish in-flight requests, then run the
# app's lifespan shutdown, all within this many seconds.
graceful_timeout = 30

# Recycle workers to contain slow memory leaks; clients see no failed request.
max_requests = 10000
max_requests_jitter = 1000

limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# Trust X-Forwarded-For/-Proto only from the reverse proxy in front of us.
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1")

accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(D)sus'

# uvworker options Gunicorn has no setting for, as UVWORKER_<NAME> variables.
raw_env = [
    "UVWORKER_TIMEOUT_REQUEST_HEADER=10",  # a client must send its request head within 10 s
    "UVWORKER_TIMEOUT_REQUEST_BODY=20",  # and not let its request body stall for longer
    # A request still unanswered after 55 s gets a 504 from us (logged with its path), before
    # a proxy in front gives up on its own (nginx's default proxy_read_timeout: 60 s).
    "UVWORKER_TIMEOUT_REQUEST=55",
]


def worker_abort(worker):
    worker.log.warning("Worker %s was stuck for %s s and is being replaced.", worker.pid, timeout)
