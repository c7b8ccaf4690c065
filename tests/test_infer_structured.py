"""Structured outputs (dsv3.infer.structured): a request's output held to a JSON schema, any JSON object, a regex,
a choice or a Lark grammar, greedy and sampled, on the random tiny model (which on its own writes no JSON at all).

Checked: every output satisfies its constraint and ends ("stop") where the grammar is complete; a constrained row in
a batch gets the tokens it gets alone, and the unconstrained rows beside it are untouched (bit-identical greedy
outputs), also with the overlap schedule and with MTP speculation on (constrained batches take plain steps); the
log-probabilities are the model's own; a spec that does not compile is one ValueError naming it; through the server,
OpenAI's `response_format` with the real `openai` client, vLLM's `structured_outputs`, and 400s for bad ones.
"""

import json
import re

import httpx
import torch

import pytest

pytest.importorskip("llguidance", reason="structured outputs need llguidance (CI pins it)")

import openai  # noqa: E402
from serve_fixture import DEFAULT_CONFIG, build_engine, start_server  # noqa: E402

from dsv3.data import SPECIAL_TOKENS  # noqa: E402
from dsv3.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from dsv3.infer.structured import GRAMMAR_ERROR  # noqa: E402
from dsv3.infer.requests import check_request  # noqa: E402

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:"]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"type": "string", "enum": ["red", "green"]},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "tag", "ok"], "additionalProperties": False}
SPECS = {
    "json_schema": {"type": "json_schema", "schema": SCHEMA, "any_whitespace": False},
    "regex": {"type": "regex", "pattern": r"[0-9]{3}-[a-z]{2,5}"},
    "choice": {"type": "choice", "choices": ["yes", "no", "maybe not"]},
    # bounded, as every spec here: any model, on any machine's rounding, must end it within max_tokens
    "grammar": {"type": "grammar", "lark": 'start: "(" NUM ("+" NUM)? ("+" NUM)? ")"\nNUM: /[0-9]{1,3}/'},
}


def _satisfies(kind: str, text: str) -> bool:
    if kind == "json_schema":
        v = json.loads(text)
        return (set(v) == {"n", "tag", "ok"} and isinstance(v["n"], int) and 0 <= v["n"] <= 99
                and v["tag"] in ("red", "green") and isinstance(v["ok"], bool))
    if kind == "regex":
        return re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text) is not None
    if kind == "choice":
        return text in ("yes", "no", "maybe not")
    return re.fullmatch(r"\([0-9]{1,3}(\+[0-9]{1,3}){0,2}\)", text) is not None


@pytest.fixture(scope="module")
def engine():
    return build_engine()


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_outputs_satisfy_their_constraint(engine, kind):
    params = [SamplingParams(temperature=t, max_tokens=60, seed=s, structured_output=SPECS[kind])
              for t, s in ((0.0, None), (1.0, 1), (1.0, 2), (0.7, 3))]
    outs = engine.generate(PROMPTS, params)
    for o in outs:
        assert o.finish_reason == "stop" and _satisfies(kind, o.text), (kind, o.text)
    free = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert not _satisfies("regex", free.text)             # the model alone writes something else


def test_any_json_object(engine):
    spec = {"type": "json_object", "any_whitespace": False}
    for o in engine.generate(PROMPTS, [SamplingParams(temperature=0.0, max_tokens=200, structured_output=spec)] +
                             [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_output=spec)
                              for s in range(3)]):
        assert o.text.startswith("{")
        if o.finish_reason == "stop":                       # a sampled object may outrun max_tokens
            assert isinstance(json.loads(o.text), dict)


@pytest.mark.parametrize("config", [dict(), dict(overlap_schedule="on"), dict(num_speculative_tokens=1)],
                         ids=["plain", "overlap", "mtp"])
def test_a_constrained_row_leaves_its_batch_alone(engine, config):
    e = Engine(engine.model, engine.tokenizer, EngineConfig(**{**DEFAULT_CONFIG.__dict__, **config}))
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    constrained = [SamplingParams(temperature=0.0, max_tokens=40, structured_output=SPECS[k]) for k in sorted(SPECS)]
    alone_free = [o.token_ids for o in e.generate(PROMPTS, free)]
    alone = [e.generate([p], c)[0].token_ids for p, c in zip(PROMPTS, constrained)]
    mixed = e.generate(PROMPTS + PROMPTS, [free] * 4 + constrained)
    assert [o.token_ids for o in mixed[:4]] == alone_free
    assert [o.token_ids for o in mixed[4:]] == alone
    assert all(_satisfies(k, o.text) for k, o in zip(sorted(SPECS), mixed[4:]))
    if config.get("overlap_schedule") == "on":          # the free rows alone did chain: the schedule was on
        assert e.stats()["step_chained_steps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_masks_on_the_gpu(engine):
    """The bitmask goes to the device through pinned memory (no sync) and masks there: bf16 on CUDA, decode graphs
    and the overlap schedule on (their default), constrained rows beside free ones."""
    model = build_engine().model.to(device="cuda", dtype=torch.bfloat16)
    e = Engine(model, engine.tokenizer, EngineConfig(block_size=16, num_blocks=128, max_num_seqs=32))
    assert e.runner.graphs is not None and e.overlap
    kinds = [k for k in ("choice", "json_schema", "regex") for _ in (0, 1)]     # the bounded ones: they must end
    constrained = [SamplingParams(temperature=t, seed=1, max_tokens=60, structured_output=SPECS[k])
                   for k, t in zip(kinds, (0.0, 1.0) * 3)]
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = e.generate(PROMPTS * 3, constrained + [free] * 6)
    assert all(o.finish_reason == "stop" and _satisfies(k, o.text) for k, o in zip(kinds, outs[:6]))
    # (free rows beside them: bf16 GEMMs of another batch size may round differently, so no token equality here)
    assert all(len(o.token_ids) == 24 for o in outs[6:])


def test_logprobs_are_the_models_own(engine):
    spec = SPECS["choice"]
    out = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8, logprobs=3,
                                                        structured_output=spec))[0]
    first = out.token_ids[0]
    free = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))[0]
    # the model's own distribution: its top choice (not allowed here) still heads the alternatives
    assert out.logprobs[0][2][0] == free.logprobs[0][2][0] != first
    assert out.logprobs[0][0] < free.logprobs[0][0]


def test_marker_text_and_long_choice_lists_are_held_as_text(engine):
    """A choice spelling a marker's text comes out as that text in ordinary tokens (llguidance's forced text was
    tokenised with the markers recognised: the marker alone was allowed, then refused once sampled, and the output
    ended as a "stop" on an empty text); a list of 2,500 choices is held to the end (as a rule of alternatives it
    passed llguidance's 2,000 items a row and failed mid-output)."""
    tok = engine.tokenizer
    marker = SPECIAL_TOKENS["user"]
    long = [f"option number {i}" for i in range(2500)]
    for spec, allowed in (({"type": "choice", "choices": [marker]}, {marker}),
                          ({"type": "choice", "choices": long}, set(long))):
        for o in engine.generate(PROMPTS[:2], [SamplingParams(temperature=t, seed=1, max_tokens=40,
                                                              structured_output=spec) for t in (0.0, 1.0)]):
            assert o.finish_reason == "stop" and o.text in allowed, (o.text, o.token_ids)
            assert all(t >= len(SPECIAL_TOKENS) for t in o.token_ids if t != tok.eos_id), o.token_ids


WIDE = "start: a\na: " + " | ".join(f'"x{i}"' for i in range(2500))    # a row of 2,500 items: past llguidance's limit


def test_a_grammar_that_fails_mid_output_is_not_a_stop(engine):
    """A grammar that compiles and takes its first token, then passes a parser limit, ends the output with
    GRAMMAR_ERROR (before: "stop", as if its text satisfied it); the batch beside it is untouched."""
    params = [SamplingParams(temperature=0.0, max_tokens=20, structured_output={"type": "grammar", "lark": WIDE}),
              SamplingParams(temperature=0.0, max_tokens=8)]
    failed, free = engine.generate(PROMPTS[:2], params)
    assert failed.finish_reason == GRAMMAR_ERROR
    assert free.text == engine.generate(PROMPTS[1:2], params[1])[0].text


@pytest.mark.parametrize("spec, says", [
    ({"type": "regex", "pattern": "[0-9"}, "regex"),
    ({"type": "grammar", "lark": "start: missing_rule"}, "unknown name"),
    ({"type": "json_schema", "schema": {"type": "objec"}}, "objec"),
    ({"type": "regex", "pattern": "[^\\x00-\\x{10FFFF}]"}, "no output can satisfy"),     # matches nothing
    ({"type": "grammar", "lark": "start: start"}, "no output can satisfy"),
])
def test_a_spec_that_does_not_compile_is_one_error(engine, spec, says):
    with pytest.raises(ValueError, match=says) as e:
        check_request("x", SamplingParams(structured_output=spec), engine.limits, engine.tokenizer)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", [{"type": "xml"}, {"type": "regex"}, {"type": "choice", "choices": []},
                                  {"type": "json_schema", "schema": "{}"}, {"type": "regex", "pattern": "a",
                                                                           "any_whitespace": False}, "json"])
def test_a_malformed_spec_is_refused(spec):
    with pytest.raises(ValueError, match="structured_output"):
        SamplingParams(structured_output=spec)


@pytest.fixture(scope="module")
def client():
    s = start_server()
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    s.stop()


def test_response_format_through_the_openai_client(client):
    messages = [{"role": "user", "content": "Give me a record."}]
    r = client.chat.completions.create(
        model="dsv3-tiny", messages=messages, max_tokens=80, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}})
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and _satisfies("json_schema", text.strip()), text
    r = client.completions.create(model="dsv3-tiny", prompt="import os", max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=20, temperature=1.0, seed=3,
                                  extra_body={"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,5}"}})
    assert _satisfies("regex", r.choices[0].text)
    r = client.completions.create(model="dsv3-tiny", prompt="x", max_tokens=20, temperature=0,
                                  extra_body={"guided_choice": ["left", "right"]})           # vLLM's older name
    assert r.choices[0].text in ("left", "right")
    stream = client.chat.completions.create(model="dsv3-tiny", messages=messages, max_tokens=80, temperature=0,
                                            stream=True, extra_body={"structured_outputs": {"choice": ["red", "blue"]}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("red", "blue")


def _deep(n: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("body, says", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}},
     "objec"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "not supported"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, "not both"),
    ({"structured_outputs": {"json": "[" * 20000}}, "not JSON"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "exactly one"),
    ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "older names"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _deep(100)}}}, "deeper"),
])
def test_bad_structured_requests_are_400s(client, body, says):
    with pytest.raises(openai.BadRequestError, match=says):
        client.chat.completions.create(model="dsv3-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       extra_body=body)


def test_a_grammar_failed_mid_output_is_a_400_or_an_error_event(client):
    """Through the server the failed grammar is the client's 400 (streamed: an error event, then [DONE]), not a 200
    whose text breaks the constraint."""
    body = {"model": "dsv3-tiny", "prompt": "x", "max_tokens": 20, "temperature": 0,
            "structured_outputs": {"grammar": WIDE}}
    r = httpx.post(f"{client.base_url}completions", json=body, timeout=60)
    assert r.status_code == 400 and "structured output failed" in r.json()["error"]["message"], r.text
    with httpx.stream("POST", f"{client.base_url}completions", json=dict(body, stream=True), timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events
    assert "structured output failed" in json.loads(events[-2].removeprefix("data: "))["error"]["message"]


@pytest.mark.parametrize("extra, param", [
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
])
def test_a_structured_output_that_does_not_compile_names_its_field(client, extra, param):
    for path, body in (("completions", {"prompt": "x"}), ("chat/completions",
                                                          {"messages": [{"role": "user", "content": "hi"}]})):
        r = httpx.post(f"{client.base_url}{path}", json={"model": "dsv3-tiny", "max_tokens": 5, **body, **extra},
                       timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


def test_the_schema_true_is_any_json_value(client):
    r = httpx.post(f"{client.base_url}completions", json={"model": "dsv3-tiny", "prompt": "x", "max_tokens": 30,
                                                          "temperature": 0, "structured_outputs": {"json": True}},
                   timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        json.loads(choice["text"])


def test_a_lone_surrogate_in_a_pattern_is_a_400(client):
    raw = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, '
           '"structured_outputs": {"regex": "a\\ud800"}}')         # JSON's escape: no client encodes it raw
    r = httpx.post(f"{client.base_url}chat/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
