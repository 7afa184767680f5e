"""The FastAPI app: OpenAI-compatible routes over one engine.

| route | what |
| --- | --- |
| ``POST /v1/chat/completions`` | chat, streaming (SSE ``data: {...}`` ... ``data: [DONE]``) or not |
| ``POST /v1/completions`` | raw-prompt completions, streaming or not |
| ``GET /v1/models`` | the served model name(s) |
| ``GET /health`` | 200 while the engine is healthy, 503 otherwise |
| ``GET /metrics`` | Prometheus text format (see :mod:`dsv4.server.metrics`) |

With an API key, the ``/v1`` routes need ``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay
open (load balancers and scrapers rarely hold secrets). Every error is an OpenAI error body.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dsv4 import __version__
from dsv4.server.errors import APIError, error_body, install_error_handlers
from dsv4.server.metrics import CONTENT_TYPE, ServerMetrics
from dsv4.server.protocol import ChatCompletionRequest, CompletionRequest
from dsv4.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    dump,
    now,
)
from dsv4.server.serving import ServingContext

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid request (the message names the problem)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown model"},
}


def build_app(engine: Any, model_names: Sequence[str] | None = None, *, api_key: str | None = None,
              chat_template: Any = None, owns_engine: bool = False) -> FastAPI:
    """An app serving ``engine`` (an ``AsyncEngine``) as ``model_names`` (default: ``engine.model_name``).

    ``owns_engine``: shut the engine down when the app stops (the ``dsv4 serve`` case).
    """
    names = tuple(model_names or (engine.model_name,))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            await engine.shutdown()

    app = FastAPI(title="dsv4", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="OpenAI-compatible server for DeepSeek-V4.")
    install_error_handlers(app)
    ctx = ServingContext(engine, names, ServerMetrics(engine), chat_template)
    app.state.ctx = ctx
    auth = [Depends(_api_key_check(api_key))] if api_key else []

    # NOTE: imported here, not at module top: the chat route pulls in the chat encoder and parser, and
    # the rest of the app (and its tests) must not depend on them.
    from dsv4.server.chat import create_chat_completion
    from dsv4.server.completions import create_completion

    @app.post("/v1/chat/completions", dependencies=auth, response_model=None,
              responses={200: {"model": ChatCompletionResponse,
                               "description": "the completion, or an SSE stream of chunks"}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions", dependencies=auth, response_model=None,
              responses={200: {"model": CompletionResponse,
                               "description": "the completion, or an SSE stream of chunks"}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.get("/v1/models", dependencies=auth, response_model=ModelList, responses={401: _ERRORS[401]})
    async def models() -> JSONResponse:
        created = now()
        cards = [ModelCard(id=n, created=created, max_model_len=engine.max_model_len) for n in names]
        return JSONResponse(dump(ModelList(data=cards)))

    @app.get("/health", responses={503: {"model": ErrorResponse, "description": "the engine is not healthy"}})
    async def health() -> Response:
        if not engine.healthy:
            return JSONResponse(error_body("the engine is not healthy", "server_error", code="engine_unhealthy"),
                                status_code=503)
        return Response(status_code=200)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _api_key_check(key: str) -> Any:
    expected = f"Bearer {key}".encode()

    async def check(request: Request) -> None:
        got = request.headers.get("authorization", "").encode()
        # constant-time: the comparison must not leak how much of a guess was right
        if not secrets.compare_digest(got, expected):
            raise APIError("missing or incorrect API key: send `Authorization: Bearer <key>`", status=401,
                           code="invalid_api_key")

    return check
