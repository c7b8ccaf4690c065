"""Reasoning and tool calls through the HTTP layer, with the real `openai` client: non-streaming, and streaming with one
token per step so that every tag and marker arrives split over chunks.

A tiny model cannot be trained to think or call tools, so the engine here is a mock, `ScriptedEngine`: it "generates"
a given text's token ids, one per step. It tests only what the server does with known generated text (decoding with
the markers kept, parsing, deltas, finish reasons); the parsers themselves are tested directly in test_serve_tools.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import openai
import pytest

from dsv3.infer.engine import RequestOutput
from dsv3.infer.requests import RequestLimits
from dsv3.serve import build_app
from serve_fixture import serve_app
from test_serve_tools import CB, C1, C2, CE, SEP, V31, V3_CALLS, deepseek_like_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@dataclass
class ScriptedEngine:
    """A mock Engine for AsyncEngine: each request generates the next scripted ids, one token per step, then stops
    with EOS. Its final text is decoded as the Engine decodes it (special tokens skipped, the stop token left out,
    cut where a stop string starts: Engine._append)."""
    tokenizer: object
    script: list[list[int]] = field(default_factory=list)
    running: dict = field(default_factory=dict)     # request id -> (prompt, ids to emit, emitted)
    prompts: list = field(default_factory=list)
    stops: dict = field(default_factory=dict)       # request id -> its stop strings

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.tokenizer.vocab_size, 4096, 16, 1000)

    def add_request(self, ids, params) -> int:
        rid = len(self.prompts)
        self.prompts.append(ids)
        self.running[rid] = (ids, self.script.pop(0) + [self.tokenizer.eos_id], [])
        self.stops[rid] = params.stop
        return rid

    def abort(self, rid) -> None:
        self.running.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def stats(self) -> dict:
        return {}

    def step(self) -> list[RequestOutput]:
        outs = []
        for rid, (prompt, todo, done) in list(self.running.items()):
            done.append(todo[len(done)])
            eos = len(done) == len(todo)
            text = self.tokenizer.decode(done[:-1] if eos else done, skip_special_tokens=True)
            at = min((i for i in (text.find(s) for s in self.stops[rid]) if i >= 0), default=-1)
            if not eos and at < 0:
                outs.append(RequestOutput(rid, [], [], "", False, None, [done[-1]]))
                continue
            del self.running[rid]
            outs.append(RequestOutput(rid, prompt, list(done), text[:at] if at >= 0 else text, True, "stop",
                                      [done[-1]]))
        time.sleep(0.001)
        return outs


@pytest.fixture(scope="module")
def served():
    tok = deepseek_like_tokenizer()
    engine = ScriptedEngine(tok)
    app = build_app(engine, tok, "scripted", chat_template=V31)
    server, thread, url = serve_app(app)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    yield engine, client
    server.should_exit = True
    thread.join(10)


def generate(engine, client, text: str, stream: bool, **kw):
    engine.script.append(engine.tokenizer.encode(text))
    return client.chat.completions.create(model="scripted", messages=kw.pop("messages", USER), stream=stream, **kw)


def joined(chunks) -> tuple[str, str, list, str]:
    """(reasoning, content, [(index, id, name, arguments)], finish_reason) from a stream's deltas."""
    reasoning = content = ""
    calls, finish = [], None
    for c in chunks:
        d = c.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        calls += [(t.index, t.id, t.function.name, t.function.arguments) for t in d.tool_calls or []]
        finish = c.choices[0].finish_reason or finish
    return reasoning, content, calls, finish


def test_tool_calls_non_streamed_and_streamed(served):
    engine, client = served
    text = f"Checking.{CB}{C1}get_weather{SEP}{{\"city\": \"Paris\"}}{C2}{CE}"
    r = generate(engine, client, text, False, tools=TOOLS)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Checking."
    assert [(t.type, t.function.name, t.function.arguments) for t in m.tool_calls] == \
        [("function", "get_weather", '{"city": "Paris"}')]
    assert r.usage.completion_tokens == len(engine.tokenizer.encode(text)) + 1
    # the tool definitions reached the prompt
    assert '"description": "Weather of a city"' in engine.tokenizer.decode(engine.prompts[-1])
    _, content, calls, finish = joined(generate(engine, client, text, True, tools=TOOLS))
    assert (content, finish) == ("Checking.", "tool_calls")
    assert [c[0] for c in calls] == [0] and calls[0][1].startswith("call_") and calls[0][2:] == \
        ("get_weather", '{"city": "Paris"}')


def test_v3_format_and_bad_calls_over_http(served):
    engine, client = served
    tools = TOOLS + [{"type": "function", "function": {"name": "add"}}]
    r = generate(engine, client, V3_CALLS, False, tools=tools)
    assert [t.function.name for t in r.choices[0].message.tool_calls] == ["get_weather", "add"]
    bad = f"{CB}{C1}get_weather{SEP}{{city: Paris}}{C2}{CE}"          # not JSON: the text comes back as generated
    for stream in (False, True):
        r = generate(engine, client, bad, stream, tools=TOOLS)
        content, finish = (r.choices[0].message.content, r.choices[0].finish_reason) if not stream else \
            joined(r)[1::2]
        assert (content, finish) == (bad, "stop")
    # without tools the markers are special tokens like any other: left out, nothing parsed
    r = generate(engine, client, V3_CALLS, False)
    assert r.choices[0].message.content == engine.tokenizer.decode(engine.tokenizer.encode(V3_CALLS),
                                                                  skip_special_tokens=True)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"


def test_reasoning_content_non_streamed_and_streamed(served):
    engine, client = served
    thinking = {"chat_template_kwargs": {"thinking": True}}
    text = "Paris is in France.</think>It is 22C."
    r = generate(engine, client, text, False, extra_body=thinking)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == ("Paris is in France.", "It is 22C.", "stop")
    assert joined(generate(engine, client, text, True, extra_body=thinking))[:2] == ("Paris is in France.",
                                                                                     "It is 22C.")
    # V3.1's non-thinking mode closes the block in the prompt: everything is content
    r = generate(engine, client, "It is 22C.", False)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (None, "It is 22C.")
    # thinking, then a call
    text = f"Need the weather.</think>{CB}{C1}get_weather{SEP}{{\"city\": \"Paris\"}}{C2}{CE}"
    for stream in (False, True):
        r = generate(engine, client, text, stream, tools=TOOLS, extra_body=thinking)
        reasoning, content, calls, finish = joined(r) if stream else (
            r.choices[0].message.reasoning_content, r.choices[0].message.content,
            [(0, t.id, t.function.name, t.function.arguments) for t in r.choices[0].message.tool_calls],
            r.choices[0].finish_reason)
        assert (reasoning, content or None, finish) == ("Need the weather.", None, "tool_calls")
        assert [c[2:] for c in calls] == [("get_weather", '{"city": "Paris"}')]


def test_tool_history_and_completions_unaffected(served):
    engine, client = served
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "22C"}]
    r = generate(engine, client, "It is 22C.", False, messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "It is 22C." and r.choices[0].message.tool_calls is None
    prompt = engine.tokenizer.decode(engine.prompts[-1])
    assert f"{C1}get_weather{SEP}{{\"city\": \"Paris\"}}{C2}" in prompt and "22C<｜tool▁output▁end｜>" in prompt
    engine.script.append(engine.tokenizer.encode("a</think>b"))
    c = client.completions.create(model="scripted", prompt="x", max_tokens=50)
    assert c.choices[0].text == "a</think>b"


def test_a_stop_string_across_a_kept_marker_streams_what_the_message_holds(served):
    """The engine finds stop strings in its text without special tokens, where a kept marker takes no room; the
    stream held back len(stop) - 1 characters of the text WITH the markers. A stop string across a marker ("```\n"
    around V3's <｜tool▁call▁end｜>) then streamed the stop string and half the marker as content, text the message
    never holds."""
    engine, client = served
    tools = TOOLS + [{"type": "function", "function": {"name": "add"}}]
    stop = "```\n"
    cut = V3_CALLS[:V3_CALLS.index(f"```{C2}")]             # where the engine's text (markers left out) stops
    for stops in ([stop], ["Paris", stop], ["}\n```"]):
        r = generate(engine, client, V3_CALLS, False, tools=tools, stop=stops)
        message = r.choices[0].message
        _, content, calls, finish = joined(generate(engine, client, V3_CALLS, True, tools=tools, stop=stops))
        assert (content, calls, finish) == (message.content, [], r.choices[0].finish_reason), stops
        if stops == [stop]:
            assert message.content == cut and message.tool_calls is None
