"""Request bodies -> engine jobs, or the APIError the client gets.

Plain functions of (request, limits, tokenizer): no event loop and no I/O, so the routes run them on the worker
threads (they tokenise, and tokenising a long prompt takes seconds) and the tests call them directly. The order of
the checks is the cost order: the batch size, then the prompt's character count (n characters are at least
n / max_token_bytes tokens, so a prompt that certainly cannot fit is refused without tokenising it), then the
tokens themselves against the context, the cache and the vocabulary (infer.requests.check_request, the engine's own
checks).

Chat content is rendered with data/chat.py: its special-token strings are text, never turn markers. A chat plan also
says how its output is read (chat_output.ChatParsing): reasoning split or not and where it starts (reasoning.py), and
which tools may be called. Tools reach the model only through a template that lays them out: a template that ignores
`tools` (DeepSeek-V3's and R1's release templates do) gets a 400 naming the fix (`dsv3 serve --chat-template` with one
that renders them), not a prompt format of the server's invention the model was never trained on; past tool calls
and tool outputs likewise need a template that renders `tool_calls`. Tool calling also needs the tool-call tokens in
the vocabulary (DeepSeek's has them; a tokenizer dsv3 trained has not).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..data import ChatTemplate, Tokenizer
from ..data.chat import encode_pieces
from ..infer import SamplingParams
from ..infer.requests import RequestLimits, check_request
from ..infer.structured import StructuredOutputError
from .chat_output import ChatParsing, marker_ids
from .protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest, TokenizeRequest, Tool
from .reasoning import reasoning_start
from .tool_calls import MARKERS as TOOL_MARKERS
from .chat_grammar import chat_output_spec


# a request's, without the model's own (repetition_penalty is vLLM's extra field: 1 is off)
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


@dataclass
class Plan:
    """A validated request: each prompt's ids, and per choice (prompt-major, n per prompt) its engine job."""
    prompt_ids: list[list[int]]
    jobs: list[tuple[list[int], SamplingParams]] = field(default_factory=list)
    echo: list[str] = field(default_factory=list)          # with echo: each prompt's text
    parsing: ChatParsing = field(default_factory=ChatParsing)      # chat: how the output is read
    keep: frozenset[int] = frozenset()                     # chat: the marker tokens its decoding keeps


def token_limits(limits: RequestLimits, tokenizer: Tokenizer) -> RequestLimits:
    """The engine's limits with the vocabulary cut to the tokenizer's ids: a model may have embedding rows past the
    last token (DeepSeek-V3's 129,280), ids with no text to return (a logprob entry for one was a 500)."""
    return dataclasses.replace(limits, vocab_size=min(limits.vocab_size, tokenizer.vocab_size))


def check_model(name: str | None, served: str) -> None:
    if name is not None and name != served:
        raise APIError(f"the model {name!r} does not exist; this server serves {served!r}", 404, "not_found_error",
                       "model", "model_not_found")


def check_batch(n_jobs: int, max_pending: int, param: str = "prompt") -> None:
    """A request that could never be queued whole is a bad request, not a busy server (429 says retry)."""
    if n_jobs > max_pending:
        what = "prompts x n" if param == "prompt" else "n"
        raise APIError(f"the request asks for {n_jobs} generations ({what}); this server holds at most "
                       f"{max_pending} at once", param=param, code="batch_too_large")


def sampling_params(req, max_tokens: int, seed_offset: int = 0, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, defaults: Mapping | None = None,
                    structured: dict | None = None) -> SamplingParams:
    """The engine job of a request; what it leaves out comes from `defaults` (the model's generation_config.json,
    checkpoint/generation_config.py), else OpenAI's. `structured`: the chat output's grammar (chat_grammar), else
    the request's response_format / structured_outputs."""
    d = {**OPENAI_DEFAULTS, **(defaults or {})}
    top_k = d["top_k"] if req.top_k is None else req.top_k
    try:
        return SamplingParams(
            temperature=d["temperature"] if req.temperature is None else req.temperature,
            top_p=d["top_p"] if req.top_p is None else req.top_p,
            top_k=0 if top_k == -1 else top_k, max_tokens=max_tokens,
            seed=None if req.seed is None else (req.seed + seed_offset) % 2**63, stop=req.stop_list(),
            stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=d["repetition_penalty"] if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=req.token_bias(), min_tokens=req.min_tokens,
            structured_output=structured if structured is not None else req.structured_spec())
    except ValueError as e:
        raise APIError(str(e)) from None


def default_max_tokens(limits: RequestLimits, n_prompt: int) -> int:
    return max(1, min(limits.max_model_len, limits.capacity) - n_prompt)


@dataclass(frozen=True)
class Fields:
    """The request fields an error about the prompt or its length names (OpenAI's `param`): the completions API's
    `prompt` and `max_tokens`; the chat API's `messages` and whichever of max_tokens / max_completion_tokens it set."""
    prompt: str = "prompt"
    max_tokens: str = "max_tokens"


def check_min_tokens(min_tokens: int, max_tokens: int, fields: Fields) -> None:
    """min_tokens within the choice's max_tokens (the request's, or the room its prompt leaves where it set none)."""
    if min_tokens > max_tokens:
        raise APIError(f"min_tokens ({min_tokens}) must be at most {fields.max_tokens} ({max_tokens}): a choice "
                       f"cannot have more tokens than it may generate", param="min_tokens")


def overflow_param(limits: RequestLimits, n_prompt: int, fields: Fields) -> str:
    """Whose fault an overflow is: the prompt's where it leaves no room for one generated token (then no max_tokens
    helps, and the client may have set none), else the max_tokens field's."""
    return fields.prompt if n_prompt + 1 > min(limits.max_model_len, limits.capacity) else fields.max_tokens


def refuse_certain_overflow(limits: RequestLimits, n_chars: int, max_token_bytes: int, max_tokens: int,
                            fields: Fields = Fields()) -> None:
    """Refuse, before tokenising, a text of `n_chars` characters that cannot fit whatever its tokens are."""
    least = -(-n_chars // max_token_bytes)
    if least + max_tokens > limits.max_model_len:
        raise APIError(f"this model's context holds {limits.max_model_len} tokens; the prompt has {n_chars} "
                       f"characters, so at least {least} tokens, and {fields.max_tokens} asks for {max_tokens} more",
                       param=overflow_param(limits, least, fields), code="context_length_exceeded")
    if least + max_tokens > limits.capacity:
        raise APIError(f"the prompt has at least {least} tokens ({n_chars} characters): with {fields.max_tokens} it "
                       f"exceeds the cache capacity of {limits.capacity} tokens",
                       param=overflow_param(limits, least, fields))


def fits_context(limits: RequestLimits, n_prompt: int, max_tokens: int, fields: Fields = Fields()) -> None:
    if n_prompt + max_tokens > limits.max_model_len:
        raise APIError(f"this model's context holds {limits.max_model_len} tokens; the prompt has {n_prompt} and "
                       f"{fields.max_tokens} asks for {max_tokens} more",
                       param=overflow_param(limits, n_prompt, fields), code="context_length_exceeded")


def check_prompt(ids: list[int], params: SamplingParams, limits: RequestLimits, tokenizer: Tokenizer,
                 fields: Fields = Fields(), req=None) -> list[int]:
    """check_request as the API's 400, naming the prompt's field, or for a structured output that does not compile
    the field that asked for it (`req`'s)."""
    try:
        return check_request(ids, params, limits, tokenizer)
    except (ValueError, TypeError) as e:
        param = structured_param(req) if req is not None and isinstance(e, StructuredOutputError) else None
        raise APIError(str(e), param=param or fields.prompt) from None


def structured_param(req) -> str:
    """The request field a structured output came from: response_format, structured_outputs or one of its older
    guided_* names; else (a chat's forced or strict tool calls, dsv3.serve.chat_grammar) tool_choice."""
    rf = getattr(req, "response_format", None)
    if rf is not None and rf.get("type") != "text":
        return "response_format"
    if getattr(req, "structured_outputs", None) is not None:
        return "structured_outputs"
    guided = [k for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
              if getattr(req, k, None) is not None]
    return guided[0] if guided else "tool_choice"


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The template's input (ChatMessage.template_dict)."""
    return [m.template_dict() for m in messages]


def check_tool_support(template: ChatTemplate, tokenizer: Tokenizer, messages: list[ChatMessage],
                       tools: list[Tool]) -> None:
    """What a conversation with tools needs of the template and the vocabulary (the module docstring says why)."""
    if tools and not template.renders_tools:
        raise APIError("tools are not supported with this model's chat template: it does not lay out tool "
                       "definitions (DeepSeek-V3's and R1's release templates do not), so the model would never see "
                       "them; serve with --chat-template FILE, a template that renders `tools`", param="tools")
    missing = [m for m in TOOL_MARKERS if tokenizer.backend.token_to_id(m) is None]
    if tools and missing:
        raise APIError(f"tools are not supported by this model: its vocabulary lacks the tool-call tokens "
                       f"{missing[:2]}...", param="tools")
    if any(m.role == "tool" or m.tool_calls for m in messages) and not template.renders_tool_calls:
        raise APIError("tool calls and tool messages are not supported with this model's chat template: it does "
                       "not render `tool_calls`", param="messages")


def render_chat(render, req: ChatCompletionRequest | TokenizeRequest, add_generation_prompt: bool,
                tools: list[Tool]):
    """`render(messages, add_generation_prompt, tools, **chat_template_kwargs)` with a template's failures as 400s:
    a template is a program of the model's authors, and one that cannot take a conversation (raise_exception, a
    message shape it does not expect) must not fail the server."""
    try:
        return render(chat_messages(req.messages), add_generation_prompt,
                      [t.model_dump(exclude_none=True) for t in tools] or None, **(req.chat_template_kwargs or {}))
    except Exception as e:      # noqa: BLE001 (whatever the template raises is the template's failure)
        raise APIError(f"the chat template cannot render these messages: {type(e).__name__}: {e}"[:500],
                       param="messages") from None


def chat_parsing(pieces: list, reasoning: bool, tools: list[Tool]) -> ChatParsing:
    """How the output is read: where it starts is told by the end of the template's own text (reasoning.py)."""
    start = None
    if reasoning:
        text, is_user = pieces[-1] if pieces else ("", False)
        start = reasoning_start(None if is_user else text)
    return ChatParsing(start, frozenset(t.function.name for t in tools) if tools else None)


def fill_in_the_middle(req: CompletionRequest, tokenizer: Tokenizer) -> Callable[[list[int]], list[int]]:
    """A prompt's ids as the model reads them: with `suffix`, the prompt is the prefix of a fill-in-the-middle
    request in the layout of pretraining (TR 4.1, PSM: <fim_begin> prefix <fim_hole> suffix <fim_end>, the model
    writing the middle and EOS); without, as they are."""
    if not req.suffix:
        return lambda ids: ids
    if tokenizer.fim_ids is None:
        raise APIError("suffix: this model's tokenizer has no fill-in-the-middle tokens (<｜fim▁begin｜>, "
                       "<｜fim▁hole｜>, <｜fim▁end｜>)", param="suffix")
    begin, hole, end = tokenizer.fim_ids
    tail = [hole, *tokenizer.encode(req.suffix, req.split_special_tokens), end]
    return lambda ids: [begin, *ids, *tail]


def plan_completion(req: CompletionRequest, limits: RequestLimits, tokenizer: Tokenizer, max_pending: int,
                    defaults: Mapping | None = None) -> Plan:
    prompts, limits = req.prompts(), token_limits(limits, tokenizer)
    check_batch(len(prompts) * req.n, max_pending)
    check_token_ids(list(req.token_bias()), limits.vocab_size, "logit_bias")
    # here, not by SamplingParams' own check: that one lists every bad id (a 4 MB message for a million of them)
    # and came back under param "prompt"
    check_token_ids(list(req.stop_token_ids or []), limits.vocab_size, "stop_token_ids")
    score_only = req.max_tokens == 0           # echo with no completion: generate one token, drop it
    texts = [p for p in prompts if isinstance(p, str)]
    for p in texts:
        refuse_certain_overflow(limits, len(p) + len(req.suffix or ""), tokenizer.max_token_bytes,
                                req.max_tokens or 1)
    encoded = iter(tokenizer.encode_batch(texts, req.split_special_tokens) if texts else [])
    fim = fill_in_the_middle(req, tokenizer)
    prompt_lp = (req.logprobs or 0) if req.echo and req.logprobs is not None else None
    plan = Plan([])
    for p in prompts:
        ids = fim(next(encoded) if isinstance(p, str) else list(p))
        max_tokens = 1 if score_only else (req.max_tokens or default_max_tokens(limits, len(ids)))
        check_min_tokens(req.min_tokens, 0 if score_only else max_tokens, Fields())
        fits_context(limits, len(ids), max_tokens)
        # the choices differ only in their seed: the prompt and max_tokens are checked once
        check_prompt(ids, sampling_params(req, max_tokens, 0, req.logprobs, prompt_lp, defaults), limits, tokenizer,
                     req=req)
        plan.prompt_ids.append(ids)
        plan.jobs += [(ids, sampling_params(req, max_tokens, j, req.logprobs, prompt_lp, defaults))
                      for j in range(req.n)]
        if req.echo:
            plan.echo.append(p if isinstance(p, str) else tokenizer.decode(ids))
    return plan


def plan_chat(req: ChatCompletionRequest, limits: RequestLimits, tokenizer: Tokenizer, template: ChatTemplate,
              max_pending: int, defaults: Mapping | None = None, reasoning: bool = False) -> Plan:
    """`reasoning`: the server splits reasoning_content (reasoning.reasoning_enabled)."""
    check_batch(req.n, max_pending, "n")
    limits = token_limits(limits, tokenizer)
    tools = req.active_tools()
    check_tool_support(template, tokenizer, req.messages, tools)
    check_token_ids(list(req.token_bias()), limits.vocab_size, "logit_bias")
    check_token_ids(list(req.stop_token_ids or []), limits.vocab_size, "stop_token_ids")     # plan_completion's
    asked = req.max_completion_tokens or req.max_tokens
    fields = Fields("messages", "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
    n_chars = len(render_chat(template.render, req, req.add_generation_prompt, tools))     # milliseconds for MBs
    refuse_certain_overflow(limits, n_chars, tokenizer.max_token_bytes, asked or 1, fields)
    pieces = render_chat(functools.partial(template.pieces, tokenizer), req, req.add_generation_prompt, tools)
    ids = encode_pieces(tokenizer, pieces)
    max_tokens = asked or default_max_tokens(limits, len(ids))
    check_min_tokens(req.min_tokens, max_tokens, fields)
    fits_context(limits, len(ids), max_tokens, fields)
    n_top = (req.top_logprobs or 0) if req.logprobs else None
    # the grammar of the answer and the calls, after any reasoning (chat_grammar); None: free text
    tail, is_user = pieces[-1] if pieces else ("", False)
    grammar = chat_output_spec(req, tools, tokenizer, template, reasoning_start(None if is_user else tail))
    check_prompt(ids, sampling_params(req, max_tokens, 0, n_top, defaults=defaults, structured=grammar), limits,
                 tokenizer, fields, req)
    parsing = chat_parsing(pieces, reasoning, tools)
    jobs = [(ids, sampling_params(req, max_tokens, j, n_top, defaults=defaults, structured=grammar))
            for j in range(req.n)]
    return Plan([ids], jobs, parsing=parsing, keep=marker_ids(tokenizer, parsing.markers))


def tokenize_ids(req: TokenizeRequest, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """/tokenize: a raw prompt as the completions API reads it, or messages as the chat API does."""
    if req.prompt is not None:
        ids = tokenizer.encode(req.prompt, req.split_special_tokens)
    else:
        tools = list(req.tools or [])
        check_tool_support(template, tokenizer, req.messages, tools)
        ids = render_chat(functools.partial(template.encode, tokenizer), req, req.add_generation_prompt, tools)
    if req.add_special_tokens and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id] + ids
    return ids


def check_token_ids(ids: list[int], vocab_size: int, param: str = "tokens") -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"{param}: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param=param)
