"""The OpenAI API's request bodies as pydantic models, and OpenAI-style errors.

Field ranges follow the OpenAI reference where it has one (temperature [0, 2], top_p (0, 1], presence_penalty and
frequency_penalty [-2, 2], logit_bias at most 300 token ids -> [-100, 100], logprobs <= 20 for completions, top_logprobs
<= 20 for chat); at most 16 `stop` strings of at most 1024 characters and 1024 `stop_token_ids` (both are checked after
every token); `top_k`, `ignore_eos`, `stop_token_ids`, `repetition_penalty` ((0, 2] here), `min_tokens` ([0,
max_tokens]) are the common extensions (vLLM's names), `split_special_tokens` is Hugging Face's (a raw prompt's
special-token strings as text), `chat_template_kwargs` vLLM's (a template's own switches, such as V3.1's `thinking`;
booleans only: a string there would reach the prompt without being escaped as user text). Unknown fields are ignored, as
clients send many (`user` ...); fields whose non-default values we cannot honour (best_of other than n, the legacy
`functions`) are rejected with a 400 that names them. `response_format` (text, json_object, json_schema) and vLLM's
`structured_outputs` constrain the output (dsv3.infer.structured), on both endpoints; a forcing `tool_choice`, a
`strict` tool and `parallel_tool_calls: false` are held to by grammars too (dsv3.serve.chat_grammar). Types are
strict: JSON of the wrong type is a 400, never coerced (`true` is not token id 1). A chat message needs its content
(OpenAI's rule; the exception, an assistant message with tool calls); a tool message needs the `tool_call_id` it
answers.

Tools are OpenAI's `{"type": "function", "function": {"name", "description", "parameters"}}`: a name of OpenAI's
form (letters, digits, _ and -, at most 64), unique; parameters a JSON-schema object (a dict whose `type`, where
given, is "object", `properties` a dict, `required` a list of names, nested at most 64 levels).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag, field_validator,
                      model_validator)

from ..data.chat import RESERVED, json_strings
from ..infer.sampling import MAX_LOGIT_BIAS
from ..infer.structured import check_spec

# Strict: JSON of the wrong type is refused, not coerced (`true` was token id 1, "2" was 2, "no" was false).
REQUEST = ConfigDict(extra="ignore", strict=True)
TokenIds = list[StrictInt]


def _prompt_form(value: Any) -> str | None:
    """Which form a prompt has, read from its first element, so that one validator runs: pydantic's smart union
    tried every form over a 4M-id prompt, collecting millions of errors (1 s on the event loop)."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0
    return "texts" if isinstance(first, str) else "batch" if isinstance(first, list) else "ids"


Prompt = Annotated[Annotated[str, Tag("text")] | Annotated[list[str], Tag("texts")] | Annotated[TokenIds, Tag("ids")]
                   | Annotated[list[TokenIds], Tag("batch")],
                   Discriminator(_prompt_form, custom_error_type="prompt_type", custom_error_message=(
                       "prompt must be a string, a list of strings, a list of token ids or a list of lists of them"))]
MAX_N = 16
MAX_TOP_K = 2**63 - 1      # the engine carries top_k in an int64 tensor; anything >= the vocabulary means "off" anyway
MAX_SCHEMA_DEPTH = 64      # a tool's parameters: real schemas nest a few levels
# Stop conditions are checked after every token: unbounded, one request made every step slow (a million stop_token_ids
# searched per token; a stop string's length is the engine's tail window, infer/stop_rules.py). Generous bounds:
MAX_STOPS = 16             # stop strings
MAX_STOP_CHARS = 1024      # characters of one stop string
MAX_STOP_TOKEN_IDS = 1024


def _unicode(value, name: str):
    """JSON's \\uXXXX escapes can carry lone surrogates, which Python strings hold but no tokenizer (nor UTF-8)
    can: reject them here, not as a TypeError from the tokenizer."""
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return value        # token ids (a list holds one type: the prompt's discriminator, or list[str])
    for s in value if isinstance(value, list) else [value]:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{name} is not valid Unicode: lone surrogate {s[e.start]!r} at {e.start}") from None
    return value


MAX_ERROR_CHARS = 1000


def shorten(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters, saying how many were left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


class APIError(Exception):
    """An error the server answers with `{"error": {...}}` and an HTTP status. The message is cut to
    MAX_ERROR_CHARS: many quote what the client sent (a model name, a tool_choice, a number), and a body of megabytes
    came back as a message of megabytes."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        message = shorten(message)
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


_STRUCTURED = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
               "json_object": "json_object"}


def _from_structured_outputs(so: dict) -> dict:
    """vLLM's structured_outputs as a SamplingParams.structured_output."""
    unknown = sorted(set(so) - set(_STRUCTURED) - {"disable_any_whitespace"})
    if unknown:
        raise ValueError(f"structured_outputs: {unknown} not supported by this server (one of {sorted(_STRUCTURED)}, "
                         f"and disable_any_whitespace)")
    given = [k for k in _STRUCTURED if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise ValueError(f"structured_outputs needs exactly one of {sorted(_STRUCTURED)}, got {given}")
    key = given[0]
    kind, value = _STRUCTURED[key], so[key]
    spec = {"type": kind}
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"structured_outputs json is not JSON (or nests too deep): {e}"[:300]) from None
        spec["schema"] = value
    elif key != "json_object":
        spec[{"regex": "pattern", "choice": "choices", "grammar": "lark"}[key]] = value
    if "disable_any_whitespace" in so:
        if not isinstance(so["disable_any_whitespace"], bool):
            raise ValueError("structured_outputs disable_any_whitespace must be a bool")
        if kind.startswith("json"):
            spec["any_whitespace"] = not so["disable_any_whitespace"]
    return spec


class _Sampling(BaseModel):
    model_config = REQUEST
    model: str | None = None
    # None (left out): the server's defaults, the model's generation_config.json or else 1.0 / 1.0 / off
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=MAX_TOP_K)] | None = None     # -1 or 0: off
    seed: Annotated[int, Field(ge=-2**63, lt=2**64)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOPS)] | None = None
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    # vLLM's: no EOS, stop token or stop string ends a choice before it has this many tokens (<= max_tokens: checked
    # with the request's max_tokens, validation.check_min_tokens)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # penalties and logit_bias (dsv3.infer.penalties); None: off
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] | None = None
    # JSON object keys are strings: token ids written out ("50256": -100), as OpenAI's clients send them
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    # structured outputs (dsv3.infer.structured): OpenAI's response_format (text, json_object, json_schema), or
    # vLLM's structured_outputs (one of json, regex, choice, grammar (Lark), json_object; disable_any_whitespace)
    response_format: dict | None = None
    structured_outputs: dict | None = None
    # vLLM's older names of structured_outputs' keys (still sent by many clients): read, not ignored
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_unicode(cls, v):
        # here, not as a Field bound: the union's error then named both forms ("stop.constrained-str: ...")
        longest = max(map(len, [v] if isinstance(v, str) else v or []), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got {longest}")
        return _unicode(v, "stop")

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v):
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        bad = [k for k in v or {} if not (k.isascii() and k.isdigit() and len(k) <= 18)]
        if bad:
            raise ValueError(f"keys must be token ids (non-negative integers as strings), got {bad[0][:20]!r}")
        return v

    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def structured_spec(self) -> dict | None:
        """SamplingParams.structured_output of the request's response_format / structured_outputs (None: free
        text); ValueError names what is wrong."""
        rf, so = self.response_format, self.structured_outputs
        guided = {k: v for k, v in (("json", self.guided_json), ("regex", self.guided_regex),
                                    ("choice", self.guided_choice), ("grammar", self.guided_grammar)) if v is not None}
        if guided:
            if so is not None:
                raise ValueError("give structured_outputs or the guided_* fields (its older names), not both")
            so = guided
        if rf is not None and rf.get("type") != "text" and so is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        if so is not None:
            return _from_structured_outputs(so)
        if rf is None or rf.get("type") == "text":
            return None
        if rf.get("type") == "json_object":
            return {"type": "json_object"}
        if rf.get("type") == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                raise ValueError("response_format json_schema needs json_schema.schema: a JSON schema (an object)")
            return {"type": "json_schema", "schema": js["schema"]}
        raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', got "
                         f"{rf.get('type')!r:.60}")

    @model_validator(mode="after")
    def _empty_stop(self):
        if isinstance(self.stop, str) and not self.stop:
            self.stop = None
        spec = self.structured_spec()         # its form here (a 400 naming it); whether it compiles: the engine's
        if spec is not None:
            check_spec(spec)
            try:      # as a tool's parameters: every later reader (json.dumps, the grammar compiler) walks it again
                strings = json_strings(spec, MAX_SCHEMA_DEPTH)
            except ValueError:
                raise ValueError(f"the structured output's schema nests deeper than {MAX_SCHEMA_DEPTH} levels") \
                    from None
            _unicode(strings, "response_format / structured_outputs")
        return self

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self):
        # OpenAI's API and vLLM refuse it: a client asking for a usage chunk must not silently get none
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options without stream: true is not supported (it configures a stream)")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None               # fill in the middle: the prompt is the prefix (TR 4.1's PSM layout)
    best_of: int | None = None              # = n: every choice generated is returned
    split_special_tokens: bool = False      # a text prompt's special-token strings as text, not control tokens

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return _unicode(v, "prompt")

    @field_validator("suffix")
    @classmethod
    def _suffix_text(cls, v):
        return v if v is None else _unicode(v, "suffix")

    @model_validator(mode="after")
    def _checks(self):
        if self.suffix and self.echo:
            raise ValueError("echo and suffix do not combine (the prompt the model reads is not the text echoed)")
        if self.best_of not in (None, self.n):
            raise ValueError(f"best_of={self.best_of} is not supported by this server: it returns every choice it "
                             f"generates (best_of may only equal n={self.n})")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 is allowed only with echo, to score the prompt)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):             # one form per list (_prompt_form)
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = REQUEST
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text_unicode(cls, v):
        return _unicode(v, "text")


class FunctionCall(BaseModel):
    model_config = REQUEST
    name: Annotated[str, Field(min_length=1)]
    arguments: str                              # a JSON object as text, as the model wrote it

    @field_validator("name", "arguments")
    @classmethod
    def _call_unicode(cls, v):
        return _unicode(v, "tool call")


class ToolCall(BaseModel):
    """A past tool call in an assistant message."""
    model_config = REQUEST
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("id")
    @classmethod
    def _id_unicode(cls, v):
        return _unicode(v, "tool call id")

    def template_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "function": self.function.model_dump()}


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", "tool_call_id")
    @classmethod
    def _content_unicode(cls, v):
        return _unicode(v, "content")

    @model_validator(mode="after")
    def _content_required(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong in an assistant message, not a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.content is None and not self.tool_calls:
            raise ValueError(f"content is required in a {self.role} message (only an assistant message with "
                             f"tool_calls may leave it out)")
        if isinstance(self.content, list) and not self.content:
            raise ValueError("content must not be an empty list of parts")
        return self

    def text(self) -> str | None:
        if self.content is None:
            return None
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_dict(self) -> dict:
        """The message as templates read it: developer is OpenAI's new name for system; text parts are joined;
        the tool keys only where they are given (R1's template tests `'tool_calls' in message`)."""
        m = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class FunctionDefinition(BaseModel):
    model_config = REQUEST
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("description")
    @classmethod
    def _description_unicode(cls, v):
        return _unicode(v, "description")

    @model_validator(mode="after")
    def _schema(self):
        p = self.parameters
        if p is None:
            return self
        if p.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of type 'object', not {p.get('type')!r}")
        if not isinstance(p.get("properties", {}), dict):
            raise ValueError("parameters.properties must be an object")
        required = p.get("required", [])
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise ValueError("parameters.required must be a list of property names")
        try:
            # json.loads reads ~1000 levels (body.parse_body's fallback); every later reader (the template's tojson,
            # data/chat.py) walks it again, so a real schema's few levels are the limit
            strings = json_strings(p, MAX_SCHEMA_DEPTH)
        except ValueError:
            raise ValueError(f"parameters nest deeper than {MAX_SCHEMA_DEPTH} levels") from None
        _unicode(strings, "parameters")
        return self


class Tool(BaseModel):
    model_config = REQUEST
    type: Literal["function"]
    function: FunctionDefinition


def _template_kwargs(kwargs: dict | None) -> dict | None:
    # the server's variables, and the names of ChatTemplate's parameters that the kwargs are passed beside
    clash = sorted((RESERVED | {"self", "tokenizer"}) & (kwargs or {}).keys())
    if clash:
        raise ValueError(f"chat_template_kwargs may not set {clash}: the server sets them")
    return kwargs


def _unique_names(tools: list[Tool] | None) -> list[Tool] | None:
    names = [t.function.name for t in tools or []]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tools: the function names {dup} are given more than once")
    return tools


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, StrictBool] | None = None
    tools: list[Tool] | None = None
    # auto / none, or forcing a call: required / {"type": "function", "function": {"name": ...}} (chat_grammar)
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True        # false: one call at most (held to by a grammar: serve.chat_grammar)
    functions: list | None = None
    function_call: str | dict | None = None

    _tools = field_validator("tools")(_unique_names)
    _kwargs = field_validator("chat_template_kwargs")(_template_kwargs)

    @model_validator(mode="after")
    def _checks(self):
        if self.functions:
            raise ValueError("functions (deprecated by OpenAI) are not supported by this server: use tools")
        if self.function_call not in (None, "none", "auto"):
            raise ValueError(f"function_call={self.function_call!r} is not supported by this server (deprecated by "
                             f"OpenAI: use tool_choice)")
        self._check_tool_choice()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def _check_tool_choice(self) -> None:
        """tool_choice: "auto", "none", or, forcing a call (dsv3.serve.chat_grammar), "required" or
        {"type": "function", "function": {"name": NAME}} naming one of the tools."""
        tc = self.tool_choice
        if tc in (None, "none", "auto"):
            return
        named = (tc.get("function") or {}).get("name") if isinstance(tc, dict) and tc.get("type") == "function" \
            and isinstance(tc.get("function"), dict) else None
        if tc != "required" and not isinstance(named, str):
            raise ValueError(f"tool_choice={tc!r:.200} is not supported by this server (only 'auto', 'none', "
                             f"'required' and {{'type': 'function', 'function': {{'name': ...}}}})")
        if not self.tools:
            raise ValueError("tool_choice forces a tool call, but the request has no tools")
        if named is not None and named not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names the function {named!r:.80}, which is not one of the tools")
        if self.structured_spec() is not None:
            raise ValueError("a tool_choice that forces a call and response_format / structured_outputs do not "
                             "combine (the output is the call)")

    def active_tools(self) -> list[Tool]:
        """The tools the model may call: none when tool_choice is 'none'."""
        return [] if self.tool_choice == "none" else list(self.tools or [])


class TokenizeRequest(BaseModel):
    model_config = REQUEST
    _tools = field_validator("tools")(_unique_names)
    _kwargs = field_validator("chat_template_kwargs")(_template_kwargs)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None             # with messages: laid out as the chat API lays them out
    chat_template_kwargs: dict[str, StrictBool] | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True
    split_special_tokens: bool = False      # for `prompt`; message content is always text

    @field_validator("prompt")
    @classmethod
    def _prompt_unicode(cls, v):
        return _unicode(v, "prompt")

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = REQUEST
    model: str | None = None
    tokens: TokenIds
