"""The tokenizer routes (the conventions lm-evaluation-harness and vLLM's clients use): /tokenize (a raw prompt as
the completions API reads it, or messages as the chat API encodes them), /detokenize, /tokenizer_info.

Tokenising and decoding run on the worker threads, and so does writing the answer: a long prompt's ids are a long
JSON list, and neither may hold up the event loop (/health, other clients' streams)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..data.tokenizer import SPECIAL_TOKENS
from .body import WorkerBodyRoute
from .protocol import DetokenizeRequest, TokenizeRequest
from .state import get_state
from .validation import check_model, check_token_ids, token_limits, tokenize_ids

router = APIRouter(route_class=WorkerBodyRoute)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, request: Request):
    state = get_state(request)
    check_model(req.model, state.model_name)

    def answer() -> bytes:
        ids = tokenize_ids(req, state.tokenizer, state.template)
        return (f'{{"tokens": [{int_list(ids)}], "count": {len(ids)}, '
                f'"max_model_len": {state.limits.max_model_len}}}').encode()
    return Response(await state.run(answer), media_type="application/json")


def int_list(ids: list[int], chunk: int = 1 << 16) -> str:
    """'1, 2, 3' in short steps: one json.dumps of millions of ids would hold the GIL for a tenth of a second."""
    return ", ".join(", ".join(map(str, ids[i:i + chunk])) for i in range(0, len(ids), chunk))


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, request: Request):
    state = get_state(request)
    check_model(req.model, state.model_name)

    def answer() -> dict:
        # the tokenizer's ids, not the model's padded embedding rows past them: the tokenizer decodes those to
        # nothing, and the completions API refuses them as prompt ids
        check_token_ids(req.tokens, token_limits(state.limits, state.tokenizer).vocab_size)
        return {"prompt": state.tokenizer.decode_batch([req.tokens])[0]}
    return await state.respond(answer)


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    state = get_state(request)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS["bos"],
            "eos_token": SPECIAL_TOKENS["eos"], "pad_token": SPECIAL_TOKENS["pad"],
            "chat_template": state.template.source, "model_max_length": state.limits.max_model_len}
