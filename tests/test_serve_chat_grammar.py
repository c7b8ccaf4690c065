"""The grammars a chat request's output is held to (dsv3.serve.chat_grammar): a forcing tool_choice ("required",
a named function), a `strict` tool or `parallel_tool_calls: false` under `auto`, a response format beside tools, and
reasoning before any of them. Over HTTP (real `openai` client), the random tiny model served with V3.1's template
and a DeepSeek-like vocabulary then always answers with calls to the allowed tools whose arguments satisfy their
schemas (non-streamed and streamed, greedy and sampled); each grammar takes the outputs it should (in V3.1's and
R1's call layouts) and nothing else; what cannot be honoured is a 400 naming it.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

pytest.importorskip("llguidance", reason="structured outputs need llguidance (CI pins it)")

import llguidance  # noqa: E402
from conftest import build, tiny_config  # noqa: E402
from serve_fixture import serve_app  # noqa: E402
from test_serve_tools import C1, C2, CB, CE, R1, SEP, V31, deepseek_like_tokenizer  # noqa: E402

from dsv3.data import ChatTemplate  # noqa: E402
from dsv3.infer import Engine, EngineConfig  # noqa: E402
from dsv3.infer.structured import grammar_of, ll_tokenizer  # noqa: E402
from dsv3.serve import build_app  # noqa: E402
from dsv3.serve.protocol import ChatCompletionRequest  # noqa: E402
from dsv3.serve.chat_grammar import chat_output_spec  # noqa: E402

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


def test_json_mode_after_r1_reasoning_over_http():
    """R1's template leaves the model inside <think>: the format holds after </think>, so the JSON lands in `content`
    and the thoughts in `reasoning_content` (the random model is steered to close its thoughts at once by a
    logit_bias on </think>: the grammar allows it, and the answer that follows is held to the schema)."""
    tok = deepseek_like_tokenizer()
    model = build(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=2048), seed=0, dtype=torch.float64)
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=400, max_num_seqs=16))
    server, thread, url = serve_app(build_app(engine, tok, "tiny", chat_template=R1))
    try:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                  "required": ["city"], "additionalProperties": False}
        think_end = tok.backend.token_to_id("</think>")
        for seed in (1, 2):
            # compact JSON: bounded whatever a random model's rounding on another machine picks
            r = c.chat.completions.create(
                model="tiny", messages=USER, max_tokens=60, temperature=1.0, seed=seed,
                logit_bias={str(think_end): 100},
                extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
            m = r.choices[0].message
            assert r.choices[0].finish_reason == "stop", r
            assert json.loads(m.content)["city"] in ("Paris", "Oslo") and not getattr(m, "reasoning_content", None)
    finally:
        server.should_exit = True
        thread.join(10)


def test_strict_tools_are_served(client):
    strict = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], strict=True))]
    r = client.chat.completions.create(model="tiny", messages=USER, tools=strict, max_tokens=40, temperature=1.0,
                                       seed=5)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length", "tool_calls")
    assert all(_valid(t.function.name, t.function.arguments) for t in c.message.tool_calls or [])


def _accepts(spec: dict, tok, text: str, eos: bool = False) -> bool:
    """Whether the grammar takes `text` as a whole output (then EOS, with `eos`: an output that may go on)."""
    m = llguidance.LLMatcher(ll_tokenizer(tok, tok.vocab_size, (tok.eos_id,)), grammar_of(spec))
    ok = m.consume_tokens(tok.encode(text)) and (not eos or m.consume_token(tok.eos_id))
    return ok and m.is_stopped()


def _spec(tok, template=V31, start="answering", **request):
    req = ChatCompletionRequest(messages=USER, **request)
    return chat_output_spec(req, req.active_tools(), tok, ChatTemplate(template), start)


def test_each_layouts_grammar_takes_its_calls_only():
    tok = deepseek_like_tokenizer()
    weather, add = '{"city": "Oslo", "days": 3}', '{"a": 1, "b": -2}'
    v31 = _spec(tok, tools=TOOLS, tool_choice="required")
    assert _accepts(v31, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{C1}add{SEP}{add}{C2}{CE}")
    for wrong in (f"Sure.{CB}{C1}add{SEP}{add}{C2}{CE}",                        # content before the calls
                  f"{CB}{C1}add{SEP}{{\"a\": 1}}{C2}{CE}",                       # a required argument missing
                  f"{CB}{C1}mul{SEP}{add}{C2}{CE}",                              # not a tool
                  f"{CB}{C1}get_weather{SEP}{{\"city\": \"Rome\", \"days\": 3}}{C2}{CE}"):   # outside the enum
        assert not _accepts(v31, tok, wrong), wrong
    one_call = _spec(tok, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert _accepts(one_call, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{CE}")
    assert not _accepts(one_call, tok, f"{CB}{C1}get_weather{SEP}{weather}{C2}{C1}add{SEP}{add}{C2}{CE}")
    # R1's layout, the prompt inside <think>: free reasoning first, then the calls
    v3 = _spec(tok, R1, "thinking", tools=TOOLS, tool_choice="required")
    body = f"{C1}function{SEP}get_weather\n```json\n{weather}\n```{C2}"
    second = f"{C1}function{SEP}add\n```json\n{add}\n```{C2}"
    assert _accepts(v3, tok, f"Paris is in France.</think>{CB}{body}\n{second}{CE}")
    assert _accepts(v3, tok, f"</think>{CB}{body}{CE}")
    assert not _accepts(v3, tok, f"{CB}{body}{CE}")                              # the reasoning left open
    named = _spec(tok, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    assert _accepts(named, tok, f"{CB}{C1}add{SEP}{add}{C2}{CE}")
    assert not _accepts(named, tok, f"{CB}{C1}add{SEP}{add}{C2}{C1}add{SEP}{add}{C2}{CE}")   # one call only
    assert _spec(tok, tools=TOOLS) is None                                      # auto, nothing to hold: free text


def test_strict_tools_and_one_call_under_auto():
    tok = deepseek_like_tokenizer()
    strict = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], strict=True)), TOOLS[1]]
    g = _spec(tok, tools=strict)
    call = f"{C1}get_weather{SEP}{{\"city\": \"Oslo\", \"days\": 3}}{C2}"
    assert _accepts(g, tok, "Just text, no call.", eos=True)
    assert _accepts(g, tok, f"<think>hm</think>Let me check.{CB}{call}{C1}add{SEP}{{\"x\": [1]}}{C2}{CE}")
    assert not _accepts(g, tok, f"Checking.{CB}{C1}get_weather{SEP}{{\"city\": \"Rome\"}}{C2}{CE}")   # strict
    one = _spec(tok, tools=TOOLS, parallel_tool_calls=False)
    assert _accepts(one, tok, f"{CB}{call}{CE}")
    assert not _accepts(one, tok, f"{CB}{call}{call}{CE}")


def test_an_answer_format_beside_tools_and_after_reasoning():
    tok = deepseek_like_tokenizer()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    g = _spec(tok, tools=TOOLS, response_format=fmt)
    assert _accepts(g, tok, '{"ok": true}')
    assert _accepts(g, tok, f"{CB}{C1}add{SEP}{{\"a\": 1, \"b\": 2}}{C2}{CE}")
    assert not _accepts(g, tok, "Free text.", eos=True)
    r1 = _spec(tok, R1, "thinking", response_format=fmt)             # no tools: reasoning, then the answer
    assert _accepts(r1, tok, 'The user wants JSON.</think>{"ok": false}')
    assert not _accepts(r1, tok, '{"ok": false}</think>Sure!', eos=True)
    assert _spec(tok, response_format=fmt)["type"] == "json_schema"          # answering: the format itself


@pytest.mark.parametrize("extra, says", [
    ({"tool_choice": "required"}, "has no tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "not one of the tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "do not combine"),
    ({"tools": TOOLS, "tool_choice": "any"}, "not supported"),
])
def test_what_cannot_be_forced_is_a_400(client, extra, says):
    with pytest.raises(openai.BadRequestError, match=says):
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=5, extra_body=extra)
