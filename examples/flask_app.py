"""A Flask application served as WSGI: ``uvworker examples.flask_app:app``.

uvworker recognises the WSGI callable (``environ, start_response``) by itself; ``--interface
wsgi`` says so explicitly. Routes:

    GET  /            a greeting
    POST /echo        the request body, back (the whole body is read: for small bodies)
    POST /upload      streams the body 64 KiB at a time: size and SHA-256, in bounded memory,
                      also for chunked uploads (no Content-Length)
    GET  /stream?n=3  a streamed (chunked) response, one line per chunk
    GET  /file        this file, through wsgi.file_wrapper
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request, send_file

app = Flask(__name__)

CHUNK = 64 * 1024


@app.get("/")
def hello() -> Response:
    return jsonify(hello="world", server=request.environ.get("SERVER_SOFTWARE"))


@app.post("/echo")
def echo() -> Response:
    return Response(request.get_data(), content_type=request.content_type or "application/octet-stream")


@app.post("/upload")
def upload() -> Response:
    # request.stream is wsgi.input (bounded by Content-Length when there is one): reading it in
    # chunks keeps memory flat whatever the upload size; request.data would load it all.
    digest = hashlib.sha256()
    size = 0
    while chunk := request.stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return jsonify(bytes=size, sha256=digest.hexdigest())


@app.get("/stream")
def stream() -> Response:
    count = request.args.get("n", 3, type=int)

    def lines() -> Iterator[bytes]:
        for i in range(count):
            yield f"line {i}\n".encode()

    return Response(lines(), content_type="text/plain")


@app.get("/file")
def source() -> Response:
    return send_file(__file__, mimetype="text/x-python")
