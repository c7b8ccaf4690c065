"""A `tool_choice` that forces a call ("required": one or more calls to the request's tools, one with
`parallel_tool_calls: false`; a named function: one call to it) as a grammar over the chat template's tool-call
layout (dsv3.serve.tool_calls), so the output is the calls, each call's arguments valid JSON of its tool's
`parameters` schema (laid out as json.dumps does): a structured output (dsv3.infer.structured, llguidance's Lark with
`<[token id]>` for the markers and `%json` for the arguments).

The layout follows the template: V3's / R1's (`function<sep>NAME\\n```json\\nARGS\\n````, calls on lines of their
own) where it renders "```json", else V3.1's (`NAME<sep>ARGS`, chained). The calls start the output; where the
prompt left the model thinking (R1's and V3.1's `<think>` generation prompts), the output first closes it
(`</think>`): a forced call comes without reasoning. The output ends with the calls' end marker, and the chat
layer reads it as any other tool calls (finish reason "tool_calls").
"""

from __future__ import annotations

import json

from ..data import ChatTemplate, Tokenizer
from .protocol import ChatCompletionRequest, Tool
from .reasoning import THINK_END
from .tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP


# the arguments as json.dumps writes them, the layout of the past calls the templates render (a client's arguments
# string, json.dumps'd): no free whitespace for a model to wander in
ARGS_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def forced_tools(req: ChatCompletionRequest, tools: list[Tool]) -> list[Tool] | None:
    """The tools a forcing tool_choice allows (every tool for "required", the named one), or None: not forced."""
    tc = req.tool_choice
    if tc == "required":
        return tools
    if isinstance(tc, dict):
        return [t for t in tools if t.function.name == tc["function"]["name"]]
    return None


def forced_call_spec(req: ChatCompletionRequest, tools: list[Tool], tokenizer: Tokenizer, template: ChatTemplate,
                     thinking: bool) -> dict | None:
    """SamplingParams.structured_output for a request whose tool_choice forces a call, else None. `thinking`: the
    prompt leaves the model inside `<think>` (the output closes it first)."""
    chosen = forced_tools(req, tools)
    if chosen is None:
        return None
    tid = {m: tokenizer.backend.token_to_id(m) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    v3 = "```json" in template.source
    lit = json.dumps                   # a Lark string literal: JSON's escapes are Lark's
    rules = []
    for i, t in enumerate(chosen):
        schema = dict(t.function.parameters or {})
        schema.setdefault("type", "object")           # the reader takes an object only (tool_calls.parse_call)
        schema["x-guidance"] = ARGS_LAYOUT
        name = lit(t.function.name)
        body = (f'{lit("function")} <[{tid[SEP]}]> {name} {lit(chr(10) + "```json" + chr(10))} args{i} '
                f'{lit(chr(10) + "```")}' if v3 else f"{name} <[{tid[SEP]}]> args{i}")
        rules += [f"call{i}: <[{tid[CALL_BEGIN]}]> {body} <[{tid[CALL_END]}]>",
                  f"args{i}: %json {json.dumps(schema)}"]
    between = f"{lit(chr(10))} " if v3 else ""
    many = req.tool_choice == "required" and req.parallel_tool_calls
    calls = f"call ({between}call)*" if many else "call"
    # `</think>` is an added token in DeepSeek's vocabularies, which llguidance matches by id only
    think = tokenizer.backend.token_to_id(THINK_END)
    close = (lit(THINK_END) if think is None else f"<[{think}]>") + " " if thinking else ""
    start = f"start: {close}<[{tid[CALLS_BEGIN]}]> {calls} <[{tid[CALLS_END]}]>"
    call = "call: " + " | ".join(f"call{i}" for i in range(len(chosen)))
    return {"type": "grammar", "lark": "\n".join([start, call, *rules])}
