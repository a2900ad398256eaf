"""A Starlette application: ``uvworker examples.starlette_app:app``.

It greets, echoes request bodies, and counts visits with a counter made at lifespan startup.
"""

import itertools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Iterator[int]]]:
    # Lifespan state is shallow-copied into each request: share a mutable object, not an int.
    yield {"visits": itertools.count(1)}


async def hello(request: Request) -> JSONResponse:
    name = request.path_params.get("name", "world")
    return JSONResponse({"hello": name, "visit": next(request.state.visits)})


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(await request.body())


app = Starlette(
    routes=[Route("/", hello), Route("/hello/{name}", hello), Route("/echo", echo, methods=["POST"])],
    lifespan=lifespan,
)
