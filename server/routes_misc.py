"""`GET /v1/models`, `GET /health`, `GET /metrics`, `POST /tokenize`, `POST /detokenize`."""

from __future__ import annotations

import copy
from pathlib import PurePath

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import PlainTextResponse, Response

from server.engines import engine_healthy
from server.errors import APIError, error_response
from server.protocol_misc import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.routes_chat import chat_prompt_ids
from server.routes_common import OPENAI_ERRORS, openai_errors
from server.sampling import check_token_ids
from server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.chorus


@router.get("/v1/models", response_model=ModelList, responses=openai_errors(401, 503))
async def list_models(request: Request) -> ModelList:
    """The ensemble, with its members, weights and pooling rule as metadata; then each member
    that can be asked for alone, by its name."""
    state = _state(request)
    ready = state.require_ready()
    info = copy.deepcopy(ready.engine.info)
    info["max_model_len"] = ready.max_model_len
    for member in info.get("members", []):  # folder names only: the host's paths are not the client's business
        if member.get("path"):
            member["path"] = PurePath(member["path"]).name
    card = ModelCard(id=ready.model_name, root=ready.model_name, max_model_len=ready.max_model_len, ensemble=info)
    # Each member the engine can serve alone, under its own name (`parent`: the ensemble it is part of).
    members = [ModelCard(id=name, root=name, parent=ready.model_name, max_model_len=ready.max_model_len)
               for name in ready.servable_members]
    return ModelList(data=[card, *members])


@router.get("/health", response_class=Response,
            responses={200: {"description": "The engine is ready (empty body)."}, 503: OPENAI_ERRORS[503]})
async def health(request: Request) -> Response:
    """200 once the engine is ready; 503 while it loads, if it failed, or while shutting down."""
    try:
        ready = _state(request).require_ready()
    except APIError as err:
        return error_response(err)
    problem = await engine_healthy(ready.engine)
    if problem is not None:
        return error_response(APIError(503, f"the engine is not healthy: {problem}", code="engine_dead"))
    return Response(status_code=200)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format."}})
async def metrics(request: Request) -> Response:
    """Prometheus text format (empty until the engine is ready)."""
    ready = _state(request).ready
    body = ready.metrics.render() if ready is not None else b""
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.post("/tokenize", response_model=TokenizeResponse, responses=openai_errors(400, 401, 404, 503))
async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the chat template (vLLM's shapes)."""
    state = _state(request)
    ready = state.require_ready()
    state.check_model(ready, body.model)
    if isinstance(body, TokenizeChatRequest):
        ids = await chat_prompt_ids(ready, state, body)
    else:
        ids = await ready.tokenization.encode(body.prompt, body.add_special_tokens)
    strs = ready.tokenization.token_strs(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=ready.max_model_len, tokens=ids, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=openai_errors(400, 401, 404, 503))
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """Text of token ids."""
    state = _state(request)
    ready = state.require_ready()
    state.check_model(ready, body.model)
    check_token_ids(body.tokens, ready.tokenization.vocab_len, "tokens")
    return DetokenizeResponse(prompt=await ready.tokenization.decode(list(body.tokens)))

