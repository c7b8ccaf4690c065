"""POST /v1/completions: one prompt or a batch (strings or token ids), n choices each, streamed (SSE) or not, with
echo and logprobs, the prompt's too (lm-evaluation-harness scores a prompt with echo, logprobs and max_tokens=0).

A text prompt's special-token strings are control tokens, as in a plain tokenizer call: a raw completion is how a
caller lays out a prompt of its own, template markers included. `split_special_tokens: true` reads them as text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request

from ..data import Tokenizer
from .body import WorkerBodyRoute
from .outputs import answer, engine_failure_event
from .protocol import CompletionRequest
from .responses import Head, TextOffsets, TextStream, completion_logprobs, sse, usage
from .state import get_state
from .validation import Plan, check_model, plan_completion

router = APIRouter(route_class=WorkerBodyRoute)


@router.post("/v1/completions")
async def create_completion(req: CompletionRequest, request: Request):
    state = get_state(request)
    check_model(req.model, state.model_name)
    plan = await state.run(plan_completion, req, state.limits, state.tokenizer, state.aengine.max_pending,
                           state.options.sampling_defaults)
    head = Head.new("cmpl", "text_completion", state.model_name)
    return await answer(request, state, "/v1/completions", [len(ids) for ids in plan.prompt_ids], req, plan, head,
                        completion_events, completion_response)


def choice_logprobs(tokenizer: Tokenizer, req: CompletionRequest, plan: Plan, k: int, prompt_entries: list | None,
                    new_ids: list[int], new_entries: list, offsets: TextOffsets) -> dict | None:
    """Choice k's `logprobs` object for its new tokens, preceded by the prompt's (echo) when `prompt_entries` are
    given (the first prompt token has none); `offsets` is the choice's TextOffsets."""
    if req.logprobs is None:
        return None
    ids, entries = [], []
    if prompt_entries is not None:
        ids, entries = list(plan.prompt_ids[k // req.n]), [None] + list(prompt_entries)
    at = offsets(ids, generated=False) + offsets(list(new_ids), generated=True)
    return completion_logprobs(tokenizer, ids + list(new_ids), entries + list(new_entries), at)


def completion_response(tokenizer: Tokenizer, req: CompletionRequest, plan: Plan, head: Head, outs: list) -> dict:
    score_only = req.max_tokens == 0           # the one generated token is dropped
    choices, n_completion = [], 0
    for k, out in enumerate(outs):
        new = [] if score_only else out.token_ids
        n_completion += len(new)
        text = (plan.echo[k // req.n] if req.echo else "") + ("" if score_only else out.text)
        lp = choice_logprobs(tokenizer, req, plan, k, out.prompt_logprobs if req.echo else None, new,
                             [] if score_only or req.logprobs is None else out.logprobs, TextOffsets(tokenizer))
        choices.append({"index": k, "text": text, "logprobs": lp,
                        "finish_reason": "length" if score_only else out.finish_reason})
    return head.body(choices, usage=usage(sum(map(len, plan.prompt_ids)), n_completion))


async def completion_events(tokenizer: Tokenizer, req: CompletionRequest, plan: Plan, head: Head,
                            outputs: AsyncIterator, run) -> AsyncIterator[str]:
    """The SSE events; `run(fn, *args)` runs fn on a worker thread (ServerState.run): an echoed prompt's logprobs
    are thousands of entries, built there and not on the event loop."""
    score_only = req.max_tokens == 0
    n = len(plan.jobs)
    texts = [TextStream(tokenizer, req.stop_list()) for _ in range(n)]
    started, n_out, offsets = [False] * n, [0] * n, [TextOffsets(tokenizer) for _ in range(n)]
    async for k, out in outputs:
        if isinstance(out, Exception):
            yield sse(engine_failure_event(out))
            break
        new = [] if score_only else out.new_token_ids
        entries = out.new_logprobs if new and req.logprobs is not None else []
        n_out[k] += len(new)
        text = texts[k].delta(out, drop_last=score_only)
        first = req.echo and not started[k]
        if first:
            text = plan.echo[k // req.n] + text
        started[k] = True

        def event(k=k, text=text, first=first, out=out, new=new, entries=entries) -> str | None:
            lp = choice_logprobs(tokenizer, req, plan, k, out.prompt_logprobs if first else None, new, entries,
                                 offsets[k])
            # a chunk for every step that produced tokens, even when their text is not final yet (held back UTF-8
            # or stop-string prefix): clients and benchmarks time tokens by chunks
            if text or out.finished or lp or new:
                return sse(head.body([{"index": k, "text": text, "logprobs": lp,
                                       "finish_reason": out.finish_reason if out.finished else None}]))
            return None
        chunk = await run(event) if first and req.logprobs is not None else event()
        if chunk is not None:
            yield chunk
    if req.stream_options and req.stream_options.include_usage:
        yield sse(head.body([], usage=usage(sum(map(len, plan.prompt_ids)), sum(n_out))))
    yield sse("[DONE]")
