"""The served model (/v1/models, /v1/models/{id}: what `client.models.list()` / `.retrieve()` call), /health (the one
route open without the API key: load balancers probe it) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .async_engine import EngineStopped
from .protocol import APIError
from .state import ServerState, get_state
from .validation import check_model

router = APIRouter()


def model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "dsv3",
            "max_model_len": state.limits.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(get_state(request))]}


@router.get("/v1/models/{model_id:path}")          # served names may hold a "/" (deepseek-ai/DeepSeek-V3)
async def retrieve_model(model_id: str, request: Request):
    state = get_state(request)
    check_model(model_id, state.model_name)
    return model_card(state)


@router.get("/health")
async def health(request: Request):
    """Open without the API key (probes): the state and a generic reason only; what failed is the server log's."""
    reason = get_state(request).aengine.health_reason()
    if reason is not None:
        return JSONResponse({"status": "unhealthy", "error": reason}, status_code=503)
    return {"status": "ok"}


router.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)    # load balancers probe with it


@router.get("/metrics")
async def metrics(request: Request):
    state = get_state(request)
    try:
        stats = await state.aengine.stats()
    except EngineStopped as e:        # a scrape of a server whose engine is gone: the target is down
        raise APIError(str(e), 503, "service_unavailable") from None
    return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")
