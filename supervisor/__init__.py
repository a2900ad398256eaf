"""A generic pre-fork process manager (binds sockets, forks workers, restarts and recycles them).

It knows nothing of HTTP and imports nothing from ``uvworker``.
"""
