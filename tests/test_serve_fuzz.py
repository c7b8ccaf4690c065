"""Fuzzing `dsv3 serve`: schema-guided requests (schemathesis, from the live server's own /openapi.json, valid and
invalid), every numeric / text field at its edges, chat conversations (hypothesis: roles, content of every shape with
special-token strings inside, tool calls) and raw malformed bodies must never get a 5xx, every error must have the
OpenAI shape, a conversation must be accepted exactly when OpenAI's rules say so and then hold no control token but
the template's own, and afterwards the server must be healthy, still serve a correct greedy completion, and have
every cache block back in the pool."""

from __future__ import annotations

import json

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from dsv3.data.tokenizer import SPECIAL_TOKENS
from dsv3.infer import EngineConfig, SamplingParams
from serve_fixture import all_blocks_free, start_server

ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]
FUZZ_EXAMPLES = 200          # per route and mode; with everything else the file stays well under 90 s on 2 CPUs
# A short context bounds the worst generated request (n=16, no max_tokens: 16 x 64 tokens) to well under a second
# on the tiny model, whatever max_tokens / n the generators pick; 32 blocks of 8 hold a quarter of that, so wide
# requests also go through preemption (and must still give every block back).
FUZZ_ENGINE = EngineConfig(block_size=8, num_blocks=32, max_num_seqs=32, max_num_batched_tokens=256, max_model_len=64)
SETTINGS = {"derandomize": True, "deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}


@pytest.fixture(scope="module")
def server():
    s = start_server(FUZZ_ENGINE)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:     # httpx.post() builds an SSL context per call (20 ms)
        yield c


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:      # what schemathesis' Case.call sends with
        yield s


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def assert_openai_error(status: int, content_type: str, text: str) -> None:
    assert content_type.startswith("application/json"), f"{status} {content_type}: {text[:2000]}"
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err


def assert_sane(status: int, content_type: str, text: str, request: object = None) -> None:
    assert status < 500, f"{status} for {request!r}: {text[:2000]}"
    if status >= 400:
        assert_openai_error(status, content_type, text)
    elif content_type.startswith("text/event-stream"):
        # a stream has sent its 200 before the engine runs: a failure shows only as an error event
        assert '"server_error"' not in text, f"{request!r}: {text[-2000:]}"


def post(client: httpx.Client, route: str, content: bytes, content_type: str | None = "application/json") -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    r = client.post(route, content=content, headers=headers)
    assert_sane(r.status_code, r.headers.get("content-type", ""), r.text, (route, content[:300], content_type))


# ---- schemathesis ---------------------------------------------------------------------------------------------
# Driven through schemathesis' Python API rather than its pytest plugin, whose lazy fixture loader reads a pytest
# private (Function._nodeid) that pytest 9 no longer has.

def call_and_check(case, url: str, session: requests.Session) -> None:
    response = case.call(base_url=url, session=session, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    content_type = (response.headers.get("content-type") or [""])[0]     # schemathesis: name -> list of values
    assert_sane(response.status_code, content_type, response.text, (case.method, case.path, case.body))


@pytest.mark.parametrize("route", ROUTES)
def test_schema_coverage(api_schema, server, session, route):
    """Schemathesis' coverage phase: boundary values, each property missing or of each wrong type, other methods."""
    op = api_schema[route]["POST"]
    cases = list(api_schema.iter_coverage_cases(
        op, generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=api_schema.config.generation_for(operation=op, phase="coverage")))
    assert len(cases) > 20
    for case in cases:
        call_and_check(case, server.url, session)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("route", ROUTES)
def test_schema_fuzz(api_schema, server, session, route, mode):
    @settings(max_examples=FUZZ_EXAMPLES, **SETTINGS)
    @given(case=api_schema[route]["POST"].as_strategy(mode))
    def fuzz(case):
        call_and_check(case, server.url, session)
    fuzz()


# ---- every field at its edges ---------------------------------------------------------------------------------
# Random generation rarely reaches int64 / uint64 bounds or lone surrogates, where the engine's tensors and the
# tokenizer break; so each is put, one at a time, into a request that is otherwise valid.

BASES = {
    "/v1/completions": [{"prompt": "def f(x):", "max_tokens": 4},
                        {"prompt": "def f(x):", "max_tokens": 4, "stream": True, "echo": True, "logprobs": 2}],
    "/v1/chat/completions": [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
                              "logprobs": True, "top_logprobs": 2}],
    "/tokenize": [{"prompt": "hi"}, {"messages": [{"role": "user", "content": "hi"}]}],
    "/detokenize": [{"tokens": [5, 6]}],
}
NUMBERS = [0, -1, 1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30, 0.5, 1.0,
           1e308, -1e308, 5e-324, 1e-46, float("nan"), float("inf"), float("-inf"), True, "3"]
NUMERIC = {
    "/v1/completions": ["max_tokens", "n", "temperature", "top_p", "top_k", "seed", "logprobs", "presence_penalty",
                        "stop_token_ids[]", "prompt[]", "prompt[[]]"],
    "/v1/chat/completions": ["max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "seed",
                             "top_logprobs", "stop_token_ids[]"],
    "/tokenize": [],
    "/detokenize": ["tokens[]"],
}
STRINGS = ["", " ", "\x00", "\ud800", "a\udfffb", "\udc80\ud800", "\ufeff", "\U0010ffff", "é" * 3, "\n" * 40,
           "x" * 5000, "{{ 7 * 7 }}{% raw %}", SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["bos"] * 3, "dsv3-tiny"]
TEXTUAL = {
    "/v1/completions": ["prompt", "prompt[]", "stop", "stop[]", "model", "suffix"],
    "/v1/chat/completions": ["content", "content[]", "role", "stop", "model"],
    "/tokenize": ["prompt", "content", "model"],
    "/detokenize": ["model"],
}


def with_field(base: dict, field: str, value) -> dict | None:
    """`base` with `field` set to `value`; "x[]" puts it in a list, "x[[]]" in a list of lists, "content[]" in a text
    part. None where the base has no place for the field."""
    name, shape = field.split("[", 1) if "[" in field else (field, "")
    value = {"": value, "]": [value], "[]]": [[value]]}[shape]
    if name == "content" and shape:
        value = [{"type": "text", "text": value[0]}]
    body = json.loads(json.dumps(base))
    if name in ("content", "role"):
        if "messages" not in body:
            return None
        body["messages"][0][name] = value
    elif name == "prompt" and "prompt" not in body:
        return None
    else:
        body[name] = value
    return body


@pytest.mark.parametrize("route", ROUTES)
def test_edge_values(client, route):
    for base in BASES[route]:
        bodies = [with_field(base, f, v) for f in NUMERIC[route] for v in NUMBERS]
        bodies += [with_field(base, f, v) for f in TEXTUAL[route] for v in STRINGS]
        for body in filter(None, bodies):
            # json.dumps writes NaN / Infinity (the server's parser takes them) and \\uXXXX escapes for surrogates
            post(client, route, json.dumps(body).encode())


# ---- raw bodies the schema cannot describe --------------------------------------------------------------------

_text = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=20)   # st.text never has surrogates
_json_leaf = (st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.sampled_from(NUMBERS)
              | st.floats() | _text | st.sampled_from(STRINGS[:10]))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_text, inner, max_size=4), max_leaves=12)
_fields = sorted({f.rstrip("[]") for d in (NUMERIC, TEXTUAL) for fs in d.values() for f in fs} - {"content", "role"}
                 | {"messages", "tokens", "ignore_eos", "stream", "stream_options", "echo", "add_special_tokens",
                    "add_generation_prompt", "frequency_penalty", "logit_bias", "tools"})
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", 1])},
                                 optional={"content": _json, "name": _json})


@st.composite
def _junk_body(draw):
    """A valid base for a route with a few fields replaced by junk, so that most requests get past the JSON layer."""
    route = draw(st.sampled_from(ROUTES))
    junk = draw(st.dictionaries(st.sampled_from(_fields), _json | st.lists(_message, max_size=2), max_size=3))
    return route, draw(st.sampled_from(BASES[route])) | junk


_raw = st.tuples(st.sampled_from(ROUTES), _json.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=64)
                 | st.sampled_from([b"", b"{", b"[", b"null", b'{"prompt": "a",}', b'{"prompt": NaN}',
                                    b'{"tokens": [1e999]}', b'{"n": 1e999}', b"\xff\xfe{}", b'{"prompt": "\xff"}',
                                    b'{"prompt": "a"}}}', b"[" * 5000 + b"]" * 5000]))
_content_type = st.sampled_from(["application/json"] * 4 + ["application/json; charset=latin-1", "text/plain",
                                                            "application/x-www-form-urlencoded", None])


@settings(max_examples=500, **SETTINGS)
@given(body=_junk_body())
def test_junk_fields(client, body):
    route, obj = body
    post(client, route, json.dumps(obj).encode())


@settings(max_examples=300, **SETTINGS)
@given(raw=_raw, content_type=_content_type)
def test_raw_bodies(client, raw, content_type):
    route, content = raw
    post(client, route, content, content_type)


# ---- chat conversations ----------------------------------------------------------------------------------------
# Content is drawn from special-token strings and their fragments as much as from arbitrary text: whatever a message
# holds, the prompt's control tokens are the template's markers and nothing else (issue 14: no forged turns).

_ROLES = ["system", "developer", "user", "assistant"]
_content_text = st.lists(st.sampled_from(list(SPECIAL_TOKENS.values()) + ["<｜", "｜>", "User", "▁", "a", " ", "\n",
                                                                           "{{ 1 }}", "\x00"]) | _text,
                         max_size=8).map(lambda xs: "".join(x if isinstance(x, str) else "".join(x) for x in xs))
_part = st.fixed_dictionaries({"type": st.just("text"), "text": _content_text})
_chat_content = (_content_text | st.none() | st.lists(_part, max_size=3) | _json)
_tool_call = st.just([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
_chat_message = st.fixed_dictionaries({"role": st.sampled_from(_ROLES + ["tool", "bot"])},
                                      optional={"content": _chat_content, "tool_calls": _tool_call | _json,
                                                "name": _json})


def _utf8(s: str) -> bool:
    try:
        s.encode()
        return True
    except UnicodeEncodeError:
        return False


def _valid_message(m: dict) -> bool:
    """OpenAI's rules as this server applies them: a known role, content a string or a non-empty list of text parts
    (required: the one exception, an assistant message with tool calls, is refused as tools are)."""
    c = m.get("content")
    text_ok = (isinstance(c, str) and _utf8(c)) or (
        isinstance(c, list) and len(c) > 0 and all(isinstance(p, dict) and p.get("type") == "text"
                                                   and isinstance(p.get("text"), str) and _utf8(p["text"]) for p in c))
    return m["role"] in _ROLES and text_ok and m.get("tool_calls") in (None, [])


def _markers(tokenizer, messages: list[dict]) -> list[int]:
    """The control tokens DeepSeek-V3's template lays out for `messages`, with the generation prompt."""
    per_role = {"system": [], "developer": [], "user": [tokenizer.user_id],
                "assistant": [tokenizer.assistant_id, tokenizer.eos_id]}
    return [tokenizer.bos_id] + [i for m in messages for i in per_role[m["role"]]] + [tokenizer.assistant_id]


@settings(max_examples=300, **SETTINGS)
@given(messages=st.lists(_chat_message, max_size=4), stream=st.booleans(), n=st.integers(1, 2))
def test_chat_messages(server, client, messages, stream, n):
    body = json.dumps({"messages": messages}).encode()
    r = client.post("/tokenize", content=body, headers={"content-type": "application/json"})
    assert_sane(r.status_code, r.headers.get("content-type", ""), r.text, messages)
    valid = all(_valid_message(m) for m in messages)
    assert (r.status_code == 200) == valid, (r.status_code, r.text[:500], messages)
    if valid:
        specials = {server.tokenizer.backend.token_to_id(s) for s in SPECIAL_TOKENS.values()}
        ids = r.json()["tokens"]
        assert [i for i in ids if i in specials] == _markers(server.tokenizer, messages), messages
    chat = client.post("/v1/chat/completions", content=json.dumps(
        {"messages": messages, "max_tokens": 2, "stream": stream, "n": n}).encode(),
        headers={"content-type": "application/json"})
    assert_sane(chat.status_code, chat.headers.get("content-type", ""), chat.text, messages)
    if not valid or not messages:
        assert chat.status_code == 400, (chat.status_code, chat.text[:500], messages)
    elif chat.status_code == 200 and not stream:
        assert chat.json()["usage"]["prompt_tokens"] == len(ids)
    else:                  # a valid conversation is refused only for its length (a 64-token context here)
        assert chat.status_code == 200 or len(ids) + 2 > FUZZ_ENGINE.max_model_len, chat.text[:500]


# ---- afterwards ------------------------------------------------------------------------------------------------

def test_still_serving_after_fuzzing(server):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200       # no engine step failed
    prompt = "def read_file(path):"
    want = server.reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"model": "dsv3-tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text
    assert r.json()["choices"][0]["finish_reason"] == want.finish_reason
    assert all_blocks_free(server.engine)
