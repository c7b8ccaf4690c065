"""The grammar a chat request's output is held to, where the request asks for one (dsv3.infer.structured:
llguidance grammars; Lark with `<[token id]>` for DeepSeek's marker tokens, which llguidance matches by id only):

- tools: a `tool_choice` that forces a call ("required": one or more calls to the request's tools, one with
  `parallel_tool_calls: false`; a named function: one call to it) makes the output the calls; with `auto`, a tool
  with `strict: true` or `parallel_tool_calls: false` makes it free text with calls optional after it, and a
  response format makes it the answer or the calls. A forced call's or a strict tool's arguments satisfy its
  `parameters` schema (as vLLM holds forced calls), laid out as json.dumps writes them (the layout of the past calls
  the templates render); any other tool's are a JSON object. The call layout follows the template: V3's / R1's
  (`function<sep>NAME\\n```json\\nARGS\\n````, calls on lines of their own) where it renders "```json", else V3.1's
  (`NAME<sep>ARGS`, chained). The chat layer reads the calls as any others.
- the answer: `response_format` / `structured_outputs` (the request's own structured output) as a sub-grammar.
- reasoning: where the prompt leaves the model thinking (R1's `<think>\\n`, V3.1's thinking mode) the reasoning
  comes first, free, up to `</think>`; where the output may open a `<think>` block (the prompt decides nothing) it
  may. So JSON mode and forced calls hold for the answer, not the thoughts, and --reasoning-parser still splits them.

A request asking for none of these gets no grammar (None): free text, the engine's plain path.
"""

from __future__ import annotations

import json

from ..data import ChatTemplate, Tokenizer
from ..infer.structured import grammar_of
from .protocol import ChatCompletionRequest, Tool
from .reasoning import THINK_END, THINK_START
from .tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

# a strict tool's arguments as json.dumps writes them: no free whitespace for a model to wander in
ARGS_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_lit = json.dumps                   # a Lark string literal: JSON's escapes are Lark's


def forced_tools(req: ChatCompletionRequest, tools: list[Tool]) -> list[Tool] | None:
    """The tools a forcing tool_choice allows (every tool for "required", the named one), or None: not forced."""
    tc = req.tool_choice
    if tc == "required":
        return tools
    if isinstance(tc, dict):
        return [t for t in tools if t.function.name == tc["function"]["name"]]
    return None


def _token(tokenizer: Tokenizer, text: str) -> str:
    """A Lark terminal for `text`: its token where the vocabulary has one (an added token), else the literal."""
    tid = tokenizer.backend.token_to_id(text)
    return _lit(text) if tid is None else f"<[{tid}]>"


def _call_rules(tools: list[Tool], tokenizer: Tokenizer, v3: bool, many: bool, forced: bool) -> list[str]:
    """Lark rules: `calls` (the block of calls between its markers) and each tool's call and arguments (held to the
    tool's schema where the call is forced or the tool strict, as vLLM holds forced calls)."""
    tid = {m: tokenizer.backend.token_to_id(m) for m in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)}
    rules = []
    for i, t in enumerate(tools):
        if forced or t.function.strict:
            schema = dict(t.function.parameters or {})
            schema.setdefault("type", "object")
            schema["x-guidance"] = ARGS_LAYOUT
        else:
            schema = {"type": "object"}      # the reader takes an object only (tool_calls.parse_call)
        name = _lit(t.function.name)
        body = (f'{_lit("function")} <[{tid[SEP]}]> {name} {_lit(chr(10) + "```json" + chr(10))} args{i} '
                f'{_lit(chr(10) + "```")}' if v3 else f"{name} <[{tid[SEP]}]> args{i}")
        rules += [f"call{i}: <[{tid[CALL_BEGIN]}]> {body} <[{tid[CALL_END]}]>", f"args{i}: %json {json.dumps(schema)}"]
    between = f"{_lit(chr(10))} " if v3 else ""
    calls = f"call ({between}call)*" if many else "call"
    return [f"calls: <[{tid[CALLS_BEGIN]}]> {calls} <[{tid[CALLS_END]}]>",
            "call: " + " | ".join(f"call{i}" for i in range(len(tools))), *rules]


def chat_output_spec(req: ChatCompletionRequest, tools: list[Tool], tokenizer: Tokenizer, template: ChatTemplate,
                     start: str) -> dict | None:
    """SamplingParams.structured_output for a chat request (module docstring), or None for free text. `tools`: the
    active ones; `start`: where the prompt leaves the output (reasoning.reasoning_start)."""
    answer = req.structured_spec()
    forced = forced_tools(req, tools)
    strict = any(t.function.strict for t in tools)
    with_calls = bool(tools) and (forced is not None or strict or not req.parallel_tool_calls or answer is not None)
    if not with_calls:
        if answer is None or start == "answering" or tokenizer.backend.token_to_id(THINK_END) is None:
            return answer
    rules, subgrammars = ["TEXT: /(?s:.+)/"], []
    if answer is not None:
        sub = json.loads(grammar_of(answer))["grammars"]
        sub[0]["name"] = "answer"
        subgrammars = sub
    if with_calls:
        v3 = "```json" in template.source
        many = (forced is None or req.tool_choice == "required") and req.parallel_tool_calls
        rules += _call_rules(forced if forced is not None else tools, tokenizer, v3, many, forced is not None)
    think_start, think_end = _token(tokenizer, THINK_START), _token(tokenizer, THINK_END)
    if forced is not None:
        body = "calls"
    elif answer is not None:
        body = "@answer | calls" if with_calls else "@answer"
    else:      # auto with a strict tool / one call at most: free text (thoughts too), calls optional after it
        rules.append(f"text: (TEXT | {think_start} | {think_end})*")
        body = "text calls?"
    reasoning = {"thinking": f"TEXT? {think_end} ", "undecided": f"({think_start} TEXT? {think_end})? "}.get(
        start, "") if answer is not None or forced is not None else ""
    top = {"grammars": [{"lark_grammar": "\n".join([f"start: {reasoning}({body})", *rules])}, *subgrammars]}
    return {"type": "llguidance", "grammar": json.dumps(top)}
