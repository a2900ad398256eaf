"""Hypercorn's settings for the HTTP/2 rows (``--config python:...``): its default ends each
connection with GOAWAY after 1,000 requests, which h2load counts as failed requests."""

keep_alive_max_requests = 2**31
