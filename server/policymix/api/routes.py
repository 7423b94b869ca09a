"""Thin routers: parse, authenticate, hand over to :class:`~policymix.api.serving.Serving`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Config
from .auth import ApiKey, KeyRing, key_dependency
from .errors import ApiError
from .playground import build_playground_router
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCardOut,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .responses import ResponsesRequest, respond
from .serving import Serving

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 429, 500, 503)}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def build_routers(serving: Serving, keys: KeyRing, config: Config) -> list[APIRouter]:
    key = key_dependency(keys)
    v1 = APIRouter(prefix="/v1", responses=_ERRORS)

    @v1.post("/completions", response_model=CompletionResponse, responses={200: {"content": _SSE}})
    async def completions(body: CompletionRequest, request: Request, k: ApiKey | None = Depends(key)) -> Response:
        return await serving.completions(body, k, request)

    @v1.post("/chat/completions", response_model=ChatCompletionResponse, responses={200: {"content": _SSE}})
    async def chat(body: ChatCompletionRequest, request: Request, k: ApiKey | None = Depends(key)) -> Response:
        return await serving.chat(body, k, request)

    @v1.post("/responses", responses={200: {"content": _SSE}})
    async def responses_create(body: ResponsesRequest, request: Request, k: ApiKey | None = Depends(key)) -> Response:
        return await respond(serving, body, k, request)

    @v1.get("/models", response_model=ModelList)
    async def models(k: ApiKey | None = Depends(key)) -> ModelList:
        return serving.list_models(k)

    @v1.get("/models/{model:path}", response_model=ModelCardOut)
    async def model(model: str, k: ApiKey | None = Depends(key)) -> ModelCardOut:
        return serving.model_card(model, k)

    extras = APIRouter(responses=_ERRORS)

    @extras.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeRequest, k: ApiKey | None = Depends(key)) -> TokenizeResponse:
        return serving.tokenize(body, k)

    @extras.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None, k: ApiKey | None = Depends(key)) -> JSONResponse:
        return JSONResponse(serving.tokenizer_info(model, k))

    @extras.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest, k: ApiKey | None = Depends(key)) -> DetokenizeResponse:
        return serving.detokenize(body, k)

    ops = APIRouter()
    health_key = key_dependency(keys, open_access=config.server.open_health)
    metrics_key = key_dependency(keys, open_access=config.server.open_metrics)

    @ops.get("/health", responses={503: {"model": ErrorResponse}})
    async def health(_: ApiKey | None = Depends(health_key)) -> JSONResponse:
        if not serving.engine.is_healthy():
            raise ApiError(503, "the engine cannot serve (loading, stopped or failed)", code="unhealthy",
                           type="server_error")
        return JSONResponse({"status": "ok"})

    @ops.get("/metrics", response_class=Response)
    async def metrics(_: ApiKey | None = Depends(metrics_key)) -> Response:
        return Response(serving.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    routers = [v1, extras, ops]
    if config.server.playground:
        routers.append(build_playground_router(config, keys_required=keys.enabled))
    return routers
