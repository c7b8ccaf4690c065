"""A tool_choice that forces a call ("required", a named function) as a grammar over the template's tool-call layout
(dsv3.serve.tool_grammar): the random tiny model, served with V3.1's template and a DeepSeek-like vocabulary, then
always answers with calls to the allowed tools whose arguments satisfy their schemas (real `openai` client,
non-streamed and streamed, greedy and sampled); the grammar of each layout takes the calls a model writes in it (and
the R1 prompt's open `<think>` closed first) and nothing else; what cannot be forced is a 400 naming it.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

pytest.importorskip("llguidance")

import llguidance  # noqa: E402
from conftest import build, tiny_config  # noqa: E402
from serve_fixture import serve_app  # noqa: E402
from test_serve_tools import C1, C2, CB, CE, R1, SEP, V31, deepseek_like_tokenizer  # noqa: E402

from dsv3.data import ChatTemplate  # noqa: E402
from dsv3.infer import Engine, EngineConfig  # noqa: E402
from dsv3.infer.structured import grammar_of, ll_tokenizer  # noqa: E402
from dsv3.serve import build_app  # noqa: E402
from dsv3.serve.protocol import ChatCompletionRequest  # noqa: E402
from dsv3.serve.tool_grammar import forced_call_spec  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                                              "days": {"type": "integer", "minimum": 1, "maximum": 7}},
             "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                              "b": {"type": "integer", "minimum": -99, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": False}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def _valid(name: str, arguments: str) -> bool:
    args = json.loads(arguments)
    if name == "get_weather":
        return set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7
    return name == "add" and set(args) == {"a", "b"} and all(isinstance(v, int) and -99 <= v <= 99
                                                              for v in args.values())


@pytest.fixture(scope="module")
def client():
    tok = deepseek_like_tokenizer()
    torch.set_num_threads(1)
    model = build(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=2048), seed=0, dtype=torch.float64)
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=400, max_num_seqs=16))
    server, thread, url = serve_app(build_app(engine, tok, "tiny", chat_template=V31))
    yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    server.should_exit = True
    thread.join(10)


# "required" with parallel calls allowed lets a model chain calls for as long as it likes (the random model does not
# stop): one call per answer here, the chaining in test_each_layouts_grammar_takes_its_calls_only; the integers are
# bounded for the same reason (a random model may write digits until max_tokens)
@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "add"}),
                                           ({"type": "function", "function": {"name": "add"}}, {"add"})])
def test_forced_calls_over_http(client, choice, names):
    for temperature, seed in ((0.0, None), (1.0, 1), (1.0, 2)):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                           parallel_tool_calls=False, max_tokens=200, temperature=temperature,
                                           seed=seed)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and not c.message.content, c
        calls = c.message.tool_calls
        assert len(calls) == 1 and calls[0].function.name in names, calls
        assert _valid(calls[0].function.name, calls[0].function.arguments), calls
    stream = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice=choice,
                                            parallel_tool_calls=False, max_tokens=200, temperature=0, stream=True)
    chunks = list(stream)
    calls = [t for ch in chunks if ch.choices for t in ch.choices[0].delta.tool_calls or []]
    assert calls and all(_valid(t.function.name, t.function.arguments) for t in calls)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        ["tool_calls"]


def _accepts(spec: dict, tok, text: str) -> bool:
    m = llguidance.LLMatcher(ll_tokenizer(tok, tok.vocab_size, (tok.eos_id,)), grammar_of(spec))
    return m.consume_tokens(tok.encode(text)) and m.is_stopped()


def test_each_layouts_grammar_takes_its_calls_only():
    tok = deepseek_like_tokenizer()
    req = ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice="required")
    weather, add = '{"city": "Oslo", "days": 3}', '{"a": 1, "b": -2}'
    v31 = forced_call_spec(req, req.tools, tok, ChatTemplate(V31), thinking=False)
    assert _accepts(v31, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{C1}add{SEP}{add}{C2}{CE}")
    for wrong in (f"Sure.{CB}{C1}add{SEP}{add}{C2}{CE}",                        # content before the calls
                  f"{CB}{C1}add{SEP}{{\"a\": 1}}{C2}{CE}",                       # a required argument missing
                  f"{CB}{C1}mul{SEP}{add}{C2}{CE}",                              # not a tool
                  f"{CB}{C1}get_weather{SEP}{{\"city\": \"Rome\", \"days\": 3}}{C2}{CE}"):   # outside the enum
        assert not _accepts(v31, tok, wrong), wrong
    single = ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    one_call = forced_call_spec(single, single.tools, tok, ChatTemplate(V31), thinking=False)
    assert _accepts(one_call, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{CE}")
    assert not _accepts(one_call, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{C1}add{SEP}{add}{C2}{CE}")
    v3 = forced_call_spec(req, req.tools, tok, ChatTemplate(R1), thinking=True)      # R1's layout, <think> open
    body = f"{C1}function{SEP}get_weather\n```json\n{weather}\n```{C2}"
    assert _accepts(v3, tok, f"</think>{CB}{body}\n{C1}function{SEP}add\n```json\n{add}\n```{C2}{CE}")
    assert not _accepts(v3, tok, f"{CB}{body}{CE}")                              # the reasoning left open
    named = ChatCompletionRequest(messages=USER, tools=TOOLS, tool_choice={"type": "function",
                                                                           "function": {"name": "add"}})
    one = forced_call_spec(named, named.tools, tok, ChatTemplate(V31), thinking=False)
    assert _accepts(one, tok, f"{CB}{C1}add{SEP}{add}{C2}{CE}")
    assert not _accepts(one, tok, f"{CB}{C1}add{SEP}{add}{C2}{C1}add{SEP}{add}{C2}{CE}")   # one call only
    assert forced_call_spec(ChatCompletionRequest(messages=USER, tools=TOOLS), TOOLS, tok, ChatTemplate(V31),
                            False) is None                                      # auto: nothing forced


@pytest.mark.parametrize("extra, says", [
    ({"tool_choice": "required"}, "has no tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "not one of the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "do not combine"),
    ({"tools": TOOLS, "tool_choice": "any"}, "not supported"),
    ({"tools": TOOLS, "parallel_tool_calls": False}, "parallel_tool_calls"),
])
def test_what_cannot_be_forced_is_a_400(client, extra, says):
    with pytest.raises(openai.BadRequestError, match=says):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, extra_body=extra)
