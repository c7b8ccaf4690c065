"""The OpenAI-compatible HTTP API over one engine (FastAPI), assembled as vLLM's server is:

    app = build_app(engine, tokenizer, "dsv3-tiny", api_key=None)     # then uvicorn.run(app, host="127.0.0.1")

- state.py          ServerState: the engine, tokenizer, chat template, metrics, options and worker threads
- guard.py          Host allow-list, API key and body-size limit, before any route
- stopping.py       requests cancelled by the server's shutdown end as a 503 or a stream's error event + [DONE]
- body.py           JSON bodies parsed and validated on the worker threads
- api_completions   /v1/completions                    api_chat       /v1/chat/completions
- chat_output.py    a chat output -> message or deltas: reasoning.py (reasoning_content), tool_calls.py (tool calls)
- api_tokenizer     /tokenize, /detokenize, /tokenizer_info
- api_admin         /v1/models, /v1/models/{id}, /health, /metrics
- validation.py     request -> engine jobs or an APIError; outputs.py: submitting jobs, awaiting / merging outputs
- responses.py      engine outputs -> response bodies, chunks and logprobs

Every refusal is an OpenAI-style `{"error": {...}}` with a 4xx status: malformed JSON, wrong types or ranges and missing
chat content (400, from the pydantic models), a prompt the engine refuses (400: empty, too long for the context or the
cache, unknown token ids), a batch larger than the queue (400), an unknown model or path (404), a missing or wrong API
key (401), a body past the limit (413), a body that is not JSON (415), a foreign Host (400) or Origin (403), a full
queue (429), shutdown or a dead engine (503; also requests still running when the graceful shutdown time is up). What
the engine itself does with a request it was handed is never a 500 either: a request it refuses (a check of its own,
past these) is a 400 with its message, one whose engine step failed a 503 (retry) that says so, the cause and its
traceback logged by the server, not sent to the client. A client that disconnects has its requests aborted, which
returns their cache blocks.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import Tokenizer
from ..infer import Engine
from . import api_admin, api_chat, api_completions, api_tokenizer
from .async_engine import AsyncEngineBase
from .guard import Guard
from .metrics import route_label
from .protocol import APIError, shorten
from .state import ServeOptions, ServerState
from .stopping import EndOnStop


def build_app(engine: Engine | AsyncEngineBase, tokenizer: Tokenizer, model_name: str, **options) -> FastAPI:
    """An Engine is stepped by a thread of this process (AsyncEngine); pass an EngineProcess to keep the step loop
    in a process of its own. `options` are ServeOptions' fields (api_key, metrics_public, allowed_hosts,
    max_body_bytes, max_pending, chat_template, reasoning_parser, sampling_defaults)."""
    state = ServerState.create(engine, tokenizer, model_name, ServeOptions(**options))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.close()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.server = state
    app.state.async_engine, app.state.metrics = state.aengine, state.metrics
    for api in (api_completions, api_chat, api_tokenizer, api_admin):
        app.include_router(api.router)
    add_error_handlers(app)
    app.add_middleware(Guard, options=state.options, metrics=state.metrics)
    app.add_middleware(EndOnStop)           # outermost: whatever the server stops ends cleanly
    return app


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        # each error its share of the message: a location (a dict key) or a message may quote a huge value
        loc = shorten(".".join(str(x) for x in err.get("loc", ()) if x != "body"), 100)
        msg = shorten(err.get("msg", "invalid"), 300)
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts)


def validation_param(exc: RequestValidationError) -> str | None:
    """OpenAI's `param`: the request field of the first error (`messages` for `messages.0.content`), as the checks
    of validation.py name theirs; None for the body as a whole."""
    loc = [x for x in (exc.errors()[:1] or [{}])[0].get("loc", ()) if x != "body"]
    return shorten(str(loc[0]), 100) if loc else None


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON shape, counted under its route's template."""
    async def api_error(request: Request, exc: APIError):
        request.app.state.metrics.error(route_label(request.scope), exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def invalid(request: Request, exc: RequestValidationError):
        return await api_error(request, APIError(validation_message(exc), param=validation_param(exc)))

    async def http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = getattr(exc, "code", None)      # BodyTooLarge's: a chunked body past the limit
        return await api_error(request, APIError(str(exc.detail), exc.status_code, kind, code=code))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)
