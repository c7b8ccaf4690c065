"""POST /v1/chat/completions: messages through the model's chat template (data/chat.py: what people wrote is encoded
as text, so a message cannot forge a turn), n choices, streamed (SSE) or not, with logprobs; the output read for
reasoning and tool calls where the request and the server ask for it (chat_output.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ..data import Tokenizer
from .body import WorkerBodyRoute
from .chat_output import ChatOutput, chat_message
from .outputs import answer, engine_failure_event
from .protocol import ChatCompletionRequest
from .responses import Head, TextStream, chat_logprobs, marked_text, sse, usage
from .state import get_state
from .validation import Plan, check_model, plan_chat

router = APIRouter(route_class=WorkerBodyRoute)


@router.post("/v1/chat/completions")
async def create_chat_completion(req: ChatCompletionRequest, request: Request):
    state = get_state(request)
    check_model(req.model, state.model_name)
    plan = await state.run(plan_chat, req, state.limits, state.tokenizer, state.template, state.aengine.max_pending,
                           state.options.sampling_defaults, state.reasoning)
    head = Head.new("chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion", state.model_name)
    # n choices of one prompt: its length once
    return await answer(request, state, "/v1/chat/completions", [len(plan.prompt_ids[0])], req, plan, head,
                        chat_events, chat_response)


def chat_response(tokenizer: Tokenizer, req: ChatCompletionRequest, plan: Plan, head: Head, outs: list) -> dict:
    choices = []
    for k, out in enumerate(outs):
        message, reason = {"role": "assistant", "content": out.text}, out.finish_reason
        if plan.parsing.active:
            message, reason = chat_message(plan.parsing, marked_text(tokenizer, out, plan.keep), reason)
        choices.append({"index": k, "message": message, "finish_reason": reason,
                        "logprobs": chat_logprobs(tokenizer, out.token_ids, out.logprobs) if req.logprobs else None})
    return head.body(choices, usage=usage(len(plan.prompt_ids[0]), sum(len(o.token_ids) for o in outs)))


def merge(a: dict, b: dict) -> dict:
    """Two deltas as one: their texts and tool calls joined."""
    return a | {k: a[k] + v if k in a else v for k, v in b.items()}


async def chat_events(tokenizer: Tokenizer, req: ChatCompletionRequest, plan: Plan, head: Head,
                      outputs: AsyncIterator, run) -> AsyncIterator[str]:
    """The SSE events; `run(fn, *args)` runs fn on a worker thread (ServerState.run): a finished output's text with
    its kept markers put back (marked_text) decodes the output's prefix at every marker, seconds for thousands of
    them (a client's logit_bias asks for that), done there and not on the event loop."""
    n = len(plan.jobs)
    texts = [TextStream(tokenizer, req.stop_list(), plan.keep) for _ in range(n)]
    parsers = [ChatOutput(plan.parsing) for _ in range(n)] if plan.parsing.active else None
    n_out = [0] * n

    def chunk(k: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
        return sse(head.body([{"index": k, "delta": delta, "logprobs": lp, "finish_reason": finish}]))

    for k in range(n):
        yield chunk(k, {"role": "assistant", "content": ""})
    async for k, out in outputs:
        if isinstance(out, Exception):
            yield sse(engine_failure_event(out))
            break
        n_out[k] += len(out.new_token_ids)
        text = await run(texts[k].delta, out) if out.finished and plan.keep else texts[k].delta(out)
        reason = out.finish_reason
        if parsers is None:
            delta = {"content": text}
        else:
            delta = parsers[k].feed(text)
            if out.finished:
                delta, reason = merge(delta, parsers[k].finish()), parsers[k].finish_reason(reason)
        lp = chat_logprobs(tokenizer, out.new_token_ids, out.new_logprobs) if req.logprobs and out.new_token_ids \
            else None
        # a chunk for every step that produced tokens, even when their text is held back (clients time tokens by
        # chunks)
        if text or lp or out.new_token_ids or (parsers and delta):
            yield chunk(k, delta or {"content": ""}, lp=lp)
        if out.finished:
            yield chunk(k, {}, reason)
    if req.stream_options and req.stream_options.include_usage:
        yield sse(head.body([], usage=usage(len(plan.prompt_ids[0]), sum(n_out))))
    yield sse("[DONE]")
