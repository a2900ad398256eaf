"""Views of the example project.

    GET  /        a greeting
    POST /echo    the request body, back (request.body: small bodies only)
    POST /upload  streams the body 64 KiB at a time: size and SHA-256, in bounded memory
    GET  /stream  a StreamingHttpResponse
    GET  /file    this file, as a FileResponse (sent through wsgi.file_wrapper)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

CHUNK = 64 * 1024


@require_GET
def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"hello": "world", "path": request.path, "script_name": request.META["SCRIPT_NAME"]})


@csrf_exempt
@require_POST
def echo(request: HttpRequest) -> HttpResponse:
    return HttpResponse(request.body, content_type=request.content_type or "application/octet-stream")


@csrf_exempt
@require_POST
def upload(request: HttpRequest) -> JsonResponse:
    # Reading the request as a file streams wsgi.input; request.body would load it all. Django
    # reads nothing without a Content-Length, so a chunked upload is read from wsgi.input
    # directly: uvworker sets wsgi.input_terminated (the stream ends where the body ends).
    stream = request
    if "CONTENT_LENGTH" not in request.META and request.META.get("wsgi.input_terminated"):
        stream = request.META["wsgi.input"]
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return JsonResponse({"bytes": size, "sha256": digest.hexdigest()})


@require_GET
def stream(request: HttpRequest) -> StreamingHttpResponse:
    count = int(request.GET.get("n", 3))

    def lines() -> Iterator[bytes]:
        for i in range(count):
            yield f"line {i}\n".encode()

    return StreamingHttpResponse(lines(), content_type="text/plain")


@require_GET
def source(request: HttpRequest) -> FileResponse:
    return FileResponse(open(__file__, "rb"), content_type="text/x-python")
