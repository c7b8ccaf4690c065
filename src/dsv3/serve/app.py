"""The OpenAI-compatible HTTP API over one AsyncEngine (FastAPI).

    app = build_app(engine, tokenizer, "dsv3-tiny")        # then: uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: /v1/completions, /v1/chat/completions (both with SSE streaming), /v1/models, /health, /tokenize,
/detokenize, /tokenizer_info (the conventions lm-evaluation-harness detects), /metrics (Prometheus).

Every bad request is answered with an OpenAI-style `{"error": {...}}` and a 4xx status: malformed JSON and wrong
types or ranges (400, from the pydantic models), an unknown model (404), a prompt the engine refuses (400: empty,
too long for the context or the cache, unknown token ids), a missing or wrong API key (401), a full queue (429),
shutdown (503). A client that disconnects has its requests aborted, which returns their cache blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator

import jinja2.sandbox
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import Tokenizer
from ..data.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS
from ..infer import Engine, SamplingParams
from .async_engine import AsyncEngine, AsyncEngineBase, QueueFull, RequestHandle, ShuttingDown
from .metrics import ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest)
from .responses import TextStream, chat_logprobs, completion_logprobs, new_id, now, sse, usage

OPEN_PATHS = ("/health", "/metrics")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return "invalid request: " + "; ".join(parts)


def build_app(engine: Engine | AsyncEngineBase, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
              max_pending: int = 256, chat_template: str | None = None) -> FastAPI:
    """An Engine is stepped by a thread of this process (AsyncEngine); pass an EngineProcess to keep the step loop
    in a process of its own."""
    aengine = engine if isinstance(engine, AsyncEngineBase) else AsyncEngine(engine, max_pending)
    metrics = ServerMetrics(aengine)
    template = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        chat_template or CHAT_TEMPLATE)
    max_len, capacity = aengine.limits.max_model_len, aengine.limits.capacity

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await aengine.shutdown(drain=True)      # uvicorn has stopped accepting and waited for open responses

    async def _auth(request: Request) -> None:
        # a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides client disconnects from
        # the handlers, and a non-streaming request must notice its client leaving to abort its generation
        if api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise APIError("invalid or missing API key", 401, "authentication_error")

    app = FastAPI(title="dsv3", lifespan=lifespan, dependencies=[Depends(_auth)])
    app.state.async_engine, app.state.metrics = aengine, metrics

    # ---- errors -------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.error(request.url.path, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, APIError(_validation_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await _api_error(request, APIError(str(exc.detail), exc.status_code, kind))

    # ---- helpers ------------------------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(f"the model {name!r} does not exist; this server serves {model_name!r}", 404,
                           "not_found_error", "model", "model_not_found")

    def render(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        return template.render(messages=[{"role": "system" if m.role == "developer" else m.role,
                                          "content": m.text()} for m in messages],
                               add_generation_prompt=add_generation_prompt,
                               bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"])

    def sampling(req, max_tokens: int, seed_offset: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k in (None, -1) else req.top_k, max_tokens=max_tokens,
                seed=None if req.seed is None else (req.seed + seed_offset) % 2**63, stop=req.stop_list(),
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs)
        except ValueError as e:
            raise APIError(str(e)) from None

    def checked(prompt: str | list[int], params: SamplingParams) -> list[int]:
        try:
            return aengine.check(prompt, params)
        except (ValueError, TypeError) as e:       # TypeError: text the tokenizer cannot take
            raise APIError(str(e), param="prompt") from None

    def default_max_tokens(n_prompt: int) -> int:
        return max(1, min(max_len, capacity) - n_prompt)

    def fits_context(ids: list[int], max_tokens: int) -> None:
        if len(ids) + max_tokens > max_len:
            raise APIError(f"this model's context holds {max_len} tokens; the prompt has {len(ids)} and max_tokens "
                           f"asks for {max_tokens} more", param="max_tokens", code="context_length_exceeded")

    def submit_all(jobs: list[tuple[list[int], SamplingParams]]) -> list[RequestHandle]:
        if aengine.num_pending + len(jobs) > aengine.max_pending:
            raise APIError(f"the server is at its limit of {aengine.max_pending} pending requests; retry later",
                           429, "rate_limit_error", code="queue_full")
        try:
            return [aengine.submit(ids, params) for ids, params in jobs]
        except ShuttingDown as e:
            raise APIError(str(e), 503, "service_unavailable") from None
        except QueueFull as e:
            raise APIError(str(e), 429, "rate_limit_error", code="queue_full") from None

    async def final_outputs(request: Request, handles: list[RequestHandle]):
        """Every request's last output; None (and all of them aborted) if the client goes away first."""
        async def last(h):
            out = None
            try:
                async for out in aengine.stream(h):
                    pass
            except Exception as e:          # an engine failure: answered as a JSON 500 by engine_failure
                return e
            return out
        task = asyncio.gather(*(last(h) for h in handles))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()
                for h in handles:
                    aengine.abort(h)
                with contextlib.suppress(BaseException):
                    await task

    async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, object]]:
        """(choice index, output) from all requests as they come; cancelling aborts them all."""
        if len(handles) == 1:           # the common case, without the fan-in tasks
            try:
                async for out in aengine.stream(handles[0]):
                    yield 0, out
            except Exception as e:
                yield 0, e
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            try:
                async for out in aengine.stream(h):
                    q.put_nowait((i, out))
            except Exception as e:          # an engine failure reaches the client as an error event
                q.put_nowait((i, e))
        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            for _ in range(len(handles)):
                while True:
                    i, out = await q.get()
                    yield i, out
                    if isinstance(out, Exception) or out.finished:
                        break
        finally:
            for t in tasks:
                t.cancel()
            for h in handles:
                aengine.abort(h)

    def engine_failure(outs) -> None:
        for o in outs:
            if isinstance(o, Exception):
                raise APIError(f"the engine failed: {o}", 500, "server_error")

    # ---- completions --------------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        score_only = req.max_tokens == 0           # echo with no completion: generate one token, drop it
        jobs, prompts_ids, echo_text = [], [], []
        for p in req.prompts():
            # tokenise and check the prompt first: the default max_tokens depends on its length
            ids = checked(p, sampling(req, 1, 0))
            max_tokens = 1 if score_only else (req.max_tokens or default_max_tokens(len(ids)))
            fits_context(ids, max_tokens)
            prompts_ids.append(ids)
            echo_text.append(p if isinstance(p, str) else tokenizer.decode(ids))
            for j in range(req.n):     # the choices differ only in their seed: the real max_tokens is checked once
                params = sampling(req, max_tokens, j, req.logprobs,
                                  (req.logprobs or 0) if req.echo and req.logprobs is not None else None)
                jobs.append((checked(ids, params) if j == 0 else ids, params))
        handles = submit_all(jobs)
        metrics.request("/v1/completions", [len(ids) for ids in prompts_ids])
        created, rid = now(), new_id("cmpl")

        def logprobs_of(k: int, out, new_ids: list[int], new_entries: list, with_prompt: bool):
            if req.logprobs is None:
                return None
            ids, entries = [], []
            if with_prompt:
                ids, entries = list(prompts_ids[k // req.n]), [None] + list(out.prompt_logprobs)
            ids, entries = ids + new_ids, entries + new_entries
            return completion_logprobs(tokenizer, ids, entries, 0)

        if req.stream:
            async def events():
                texts = [TextStream(tokenizer, req.stop_list()) for _ in handles]
                started, n_out = [False] * len(handles), [0] * len(handles)
                async for k, out in merged(handles):
                    if isinstance(out, Exception):
                        yield sse(APIError(f"the engine failed: {out}", 500, "server_error").body())
                        break
                    new = [] if score_only else out.new_token_ids
                    entries = out.new_logprobs if new and req.logprobs is not None else []
                    n_out[k] += len(new)
                    text = texts[k].delta(out, drop_last=score_only)
                    lp = logprobs_of(k, out, new, entries, req.echo and not started[k])
                    if req.echo and not started[k]:
                        text = echo_text[k // req.n] + text
                    started[k] = True
                    # a chunk for every step that produced tokens, even when their text is not final yet (held
                    # back UTF-8 or stop-string prefix): clients and benchmarks time tokens by chunks
                    if text or out.finished or lp or new:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                   "choices": [{"index": k, "text": text, "logprobs": lp,
                                                "finish_reason": out.finish_reason if out.finished else None}]})
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                               "choices": [], "usage": usage(sum(map(len, prompts_ids)), sum(n_out))})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")

        outs = await final_outputs(request, handles)
        if outs is None:                # the client left; nobody reads this
            return Response(status_code=499)
        engine_failure(outs)
        choices, n_completion = [], 0
        for k, out in enumerate(outs):
            new = [] if score_only else out.token_ids
            n_completion += len(new)
            text = "" if score_only else out.text
            prefix = echo_text[k // req.n] if req.echo else ""
            lp = logprobs_of(k, out, new, list(out.logprobs) if req.logprobs is not None else [], req.echo)
            choices.append({"index": k, "text": prefix + text, "logprobs": lp,
                            "finish_reason": "length" if score_only else out.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(sum(map(len, prompts_ids)), n_completion)}

    # ---- chat ---------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        text = render(req.messages, req.add_generation_prompt)
        n_top = (req.top_logprobs or 0) if req.logprobs else None
        ids = checked(text, sampling(req, 1, 0))
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens(len(ids))
        fits_context(ids, max_tokens)
        jobs = []
        for j in range(req.n):
            params = sampling(req, max_tokens, j, n_top)
            jobs.append((checked(ids, params) if j == 0 else ids, params))
        handles = submit_all(jobs)
        metrics.request("/v1/chat/completions", [len(ids)])
        created, rid = now(), new_id("chatcmpl")

        def chunk(k: int, delta: dict, finish: str | None = None, lp=None) -> str:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [{"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}]})

        if req.stream:
            async def events():
                texts = [TextStream(tokenizer, req.stop_list()) for _ in handles]
                n_out = [0] * len(handles)
                for k in range(len(handles)):
                    yield chunk(k, {"role": "assistant", "content": ""})
                async for k, out in merged(handles):
                    if isinstance(out, Exception):
                        yield sse(APIError(f"the engine failed: {out}", 500, "server_error").body())
                        break
                    n_out[k] += len(out.new_token_ids)
                    delta = texts[k].delta(out)
                    lp = None
                    if n_top is not None and out.new_token_ids:
                        lp = chat_logprobs(tokenizer, out.new_token_ids, out.new_logprobs)
                    if delta or lp or out.new_token_ids:
                        yield chunk(k, {"content": delta}, lp=lp)
                    if out.finished:
                        yield chunk(k, {}, out.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                               "choices": [], "usage": usage(len(ids), sum(n_out))})
                yield sse("[DONE]")
            return StreamingResponse(events(), media_type="text/event-stream")

        outs = await final_outputs(request, handles)
        if outs is None:
            return Response(status_code=499)
        engine_failure(outs)
        choices = [{"index": k, "message": {"role": "assistant", "content": out.text},
                    "logprobs": chat_logprobs(tokenizer, out.token_ids, out.logprobs) if n_top is not None else None,
                    "finish_reason": out.finish_reason} for k, out in enumerate(outs)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(len(ids), sum(len(o.token_ids) for o in outs))}

    # ---- the rest -----------------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "dsv3",
                                            "max_model_len": max_len}]}

    @app.get("/health")
    async def health():
        if aengine.step_error is not None or not aengine.alive:
            return JSONResponse({"status": "unhealthy", "error": aengine.step_error or "the engine stopped"},
                                status_code=503)
        return {"status": "ok"}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        text = req.prompt if req.prompt is not None else render(req.messages, req.add_generation_prompt)
        ids = tokenizer.encode(text)
        if req.add_special_tokens and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        vocab = aengine.limits.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS["bos"],
                "eos_token": SPECIAL_TOKENS["eos"], "pad_token": SPECIAL_TOKENS["pad"],
                "chat_template": chat_template or CHAT_TEMPLATE, "model_max_length": max_len}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(await aengine.stats()), media_type="text/plain; version=0.0.4")

    return app
