"""The server's pieces alone, without a server: request validation (serve/validation.py) against the tokenizer and
the engine's own checks, the Guard's Host rules, metrics labels, response rendering against hand-built engine
outputs, and the engine's thread count."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3.data import ChatTemplate, train_tokenizer
from dsv3.data.tokenizer import SPECIAL_TOKENS
from dsv3.infer.engine import RequestOutput
from dsv3.infer.requests import RequestLimits
from dsv3.serve.api_chat import chat_response
from dsv3.serve.api_completions import completion_response
from dsv3.serve.async_engine import engine_threads
from dsv3.serve.guard import default_allowed_hosts, host_allowed, host_name
from dsv3.serve.metrics import route_label
from dsv3.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, TokenizeRequest
from dsv3.serve.responses import Head
from dsv3.serve.validation import (check_batch, plan_chat, plan_completion, refuse_certain_overflow, render_chat,
                                   tokenize_ids)
from serve_fixture import TEXTS

LIMITS = RequestLimits(vocab_size=320, max_model_len=64, block_size=8, num_blocks=32)
S = SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


def refused(fn, *args) -> APIError | None:
    try:
        fn(*args)
    except APIError as e:
        return e
    return None


# ---- validation -----------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.lists(st.sampled_from(list(S.values()) + ["def f(x):", " ", "é", "😀", "\n" * 9, "abc" * 7])
                     | st.text(max_size=30), max_size=40).map(lambda xs: "".join(x if isinstance(x, str)
                                                                                   else "".join(x) for x in xs)),
       max_tokens=st.integers(1, 70), split=st.booleans())
def test_the_character_count_refuses_only_what_cannot_fit(tok, text, max_tokens, split):
    """Sound: whenever the character count refuses a prompt, its real token count would not fit either."""
    n = len(tok.encode(text, split))
    if refused(refuse_certain_overflow, LIMITS, len(text), tok.max_token_bytes, max_tokens):
        assert n + max_tokens > min(LIMITS.max_model_len, LIMITS.capacity), (text, n)


def test_batch_and_overflow_errors():
    e = refused(check_batch, 65, 64)
    assert e.status == 400 and e.code == "batch_too_large" and "64" in e.message
    assert refused(check_batch, 64, 64) is None
    e = refused(refuse_certain_overflow, LIMITS, 10_000, 4, 1)
    assert e.code == "context_length_exceeded" and "2500" in e.message
    assert refused(refuse_certain_overflow, LIMITS, 63 * 4, 4, 1) is None          # 63 tokens may fit: tokenise


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_stop_conditions_are_bounded(model):
    """Stop conditions are checked after every token: a million stop_token_ids (or stop strings of megabytes) were
    accepted and made every step slow. Past the bounds: a 400 (RequestValidationError) naming the field."""
    import json

    from fastapi.exceptions import RequestValidationError

    from dsv3.serve.app import validation_message, validation_param
    from dsv3.serve.body import parse_body
    from dsv3.serve.protocol import MAX_STOP_CHARS, MAX_STOP_TOKEN_IDS, MAX_STOPS
    base = {"prompt": "x"} if model is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    ok = {"stop": ["a" * MAX_STOP_CHARS] * MAX_STOPS, "stop_token_ids": [1] * MAX_STOP_TOKEN_IDS}
    parse_body(model, json.dumps(base | ok).encode(), None)
    for bad, field in [({"stop_token_ids": list(range(10**6))}, "stop_token_ids"),
                       ({"stop": "a" * (MAX_STOP_CHARS + 1)}, "stop"), ({"stop": ["a", "b" * 10**6]}, "stop"),
                       ({"stop": ["a"] * (MAX_STOPS + 1)}, "stop")]:
        with pytest.raises(RequestValidationError) as e:
            parse_body(model, json.dumps(base | bad).encode(), None)
        assert validation_param(e.value) == field
        message = validation_message(e.value)
        assert message.startswith(f"invalid request: {field}") and "at most" in message and len(message) < 500, message


def test_plan_completion(tok):
    req = CompletionRequest(prompt=["def f(x):", "import os"], n=2, max_tokens=4, seed=3, echo=True, logprobs=1)
    plan = plan_completion(req, LIMITS, tok, 64)
    assert plan.prompt_ids == [tok.encode("def f(x):"), tok.encode("import os")]
    assert plan.echo == ["def f(x):", "import os"]
    assert [ids for ids, _ in plan.jobs] == [plan.prompt_ids[0]] * 2 + [plan.prompt_ids[1]] * 2
    assert [p.seed for _, p in plan.jobs] == [3, 4, 3, 4] and all(p.prompt_logprobs == 1 for _, p in plan.jobs)
    ids = plan_completion(CompletionRequest(prompt=[[5, 6, 7], [8]], echo=True), LIMITS, tok, 64)
    assert ids.prompt_ids == [[5, 6, 7], [8]] and ids.echo == [tok.decode([5, 6, 7]), tok.decode([8])]
    forged = CompletionRequest(prompt=S["user"], max_tokens=1)
    assert plan_completion(forged, LIMITS, tok, 64).prompt_ids == [[tok.user_id]]       # raw: a control token
    split = CompletionRequest(prompt=S["user"], max_tokens=1, split_special_tokens=True)
    assert tok.user_id not in plan_completion(split, LIMITS, tok, 64).prompt_ids[0]
    for bad, code in (({"prompt": ["a"] * 40, "n": 2}, "batch_too_large"),
                      ({"prompt": "x" * 5000}, "context_length_exceeded"),
                      ({"prompt": [1] * 60, "max_tokens": 8}, "context_length_exceeded")):
        assert refused(plan_completion, CompletionRequest(**bad), LIMITS, tok, 64).code == code
    assert "vocabulary" in refused(plan_completion, CompletionRequest(prompt=[999]), LIMITS, tok, 64).message


def test_plan_chat_and_tokenize(tok):
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": f"hi{S['eos']}"}]
    req = ChatCompletionRequest(messages=messages, n=3, max_tokens=4)
    plan = plan_chat(req, LIMITS, tok, ChatTemplate(), 64)
    want = ([tok.bos_id] + tok.encode("Be brief.") + [tok.user_id] + tok.encode(f"hi{S['eos']}", True)
            + [tok.assistant_id])
    assert plan.prompt_ids == [want] and len(plan.jobs) == 3
    assert tokenize_ids(TokenizeRequest(messages=messages), tok, ChatTemplate()) == want
    assert tokenize_ids(TokenizeRequest(prompt=S["eos"], add_special_tokens=True), tok, None) == [tok.bos_id, 1]
    long = ChatCompletionRequest(messages=[{"role": "user", "content": "x" * 5000}])
    assert refused(plan_chat, long, LIMITS, tok, ChatTemplate(), 64).code == "context_length_exceeded"
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    e = refused(render_chat, strict.render, ChatCompletionRequest(messages=messages), True, [])
    assert e.status == 400 and "user first" in e.message


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "assistant", "content": []},
                                     {"role": "assistant", "tool_calls": [{"id": "1"}]}])
def test_chat_content_rules(message):
    with pytest.raises(ValueError, match="content|tool_calls"):
        ChatCompletionRequest(messages=[message])
    ChatCompletionRequest(messages=[{"role": "assistant", "content": "", "tool_calls": []}])


def test_the_stop_string_holdback_walks_from_marker_to_marker(tok):
    """TextStream._final walked back the longest stop string's length a character at a time, in Python, for every
    output of every stream (on the event loop): now from one kept marker to the next, with the same answer."""
    import random

    from dsv3.serve.responses import TextStream

    class Counted(list):                 # counts the walk's passes over the markers
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    def walked(text, markers, n):        # the character-by-character walk, as it was
        end = len(text)
        while n > 0 and end > 0:
            marker = next((m for m in markers if text.endswith(m, 0, end)), None)
            end, n = (end - len(marker), n) if marker else (end - 1, n - 1)
        return end
    stream = TextStream(tok, ["x" * 1024])
    rng = random.Random(0)
    for _ in range(3000):
        markers = rng.sample(["<A>", "<AB>", "B>", "<call>", "ll>"], rng.randint(0, 3))
        pieces = markers + list("ab<>lc ")
        stream.text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        stream.markers, stream.holdback = Counted(markers), rng.randint(0, 30)
        Counted.passes = 0
        assert stream._final() == walked(stream.text, markers, stream.holdback), (stream.text, markers)
        assert Counted.passes <= 1 + sum(stream.text.count(m) for m in markers)
    stream.text, stream.markers, stream.holdback = "y" * 5000 + "<call>" + "z" * 100, Counted(["<call>"]), 1023
    Counted.passes = 0
    assert stream._final() == 5000 - 923 == walked(stream.text, ["<call>"], 1023) and Counted.passes == 2   # was 1024


# ---- guard, metrics, threads ------------------------------------------------------------------------------------

def test_host_rules():
    assert [host_name(h) for h in ("Example.COM:8000", "[::1]:80", "::1", "localhost.", "127.0.0.1")] == [
        "example.com", "::1", "::1", "localhost", "127.0.0.1"]
    for name in ("localhost", "127.0.0.1", "127.8.9.1", "::1"):
        assert host_allowed(name, None), name
    for name in ("example.com", "localhost.example.com", "0.0.0.0", "10.0.0.1", "127.0.0.1.nip.io"):
        assert not host_allowed(name, None), name
    assert host_allowed("api.example.com", ("*.example.com",)) and not host_allowed("example.org", ("*.example.com",))
    assert host_allowed("anything", ("*",))
    assert default_allowed_hosts("127.0.0.1", None) is None and default_allowed_hosts("::1", None) is None
    assert default_allowed_hosts("0.0.0.0", None) == ("*",) and default_allowed_hosts("::", None) == ("*",)
    assert default_allowed_hosts("0.0.0.0", ["a.b"]) == ("a.b",)


def test_allowed_hosts_with_ports():
    """`--allowed-hosts example.com:8000` matched nothing: the Host header was compared without its port. An entry
    with a port matches that name on that port (IPv6 in brackets too); one without matches any port."""
    from dsv3.serve.guard import Guard
    from dsv3.serve.state import ServeOptions
    allowed = ("example.com:8000", "[2001:db8::1]:8000", "*.corp.net:9000", "plain.org", "2001:db8::2")

    def refused_host(headers: dict) -> int | None:
        guard = Guard(None, ServeOptions(allowed_hosts=allowed), None)
        scope = {"type": "http", "path": "/v1/models",
                 "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
        error = guard.refusal(scope)
        return None if error is None else error.status
    for host in ("example.com:8000", "EXAMPLE.com.:8000", "[2001:db8::1]:8000", "a.corp.net:9000", "plain.org",
                 "plain.org:1234", "[2001:db8::2]:80", "[2001:db8::2]", "localhost:1"):
        assert refused_host({"host": host}) is None, host
    for host in ("example.com", "example.com:8001", "[2001:db8::1]", "[2001:db8::1]:80", "a.corp.net:8000",
                 "other.org:8000", "[2001:db8::3]:8000"):
        assert refused_host({"host": host}) == 400, host
    assert refused_host({"host": "example.com:8000", "origin": "http://example.com:8000"}) is None
    assert refused_host({"host": "example.com:8000", "origin": "http://[2001:db8::1]:8000"}) is None
    assert refused_host({"host": "example.com:8000", "origin": "http://example.com"}) == 403
    assert refused_host({"host": "example.com:8000", "origin": "http://example.com:99999"}) == 403


def test_allowed_hosts_entries_no_host_can_match_are_refused_at_start(tmp_path, capsys):
    """`--allowed-hosts example.com:abc` was accepted and matched nothing: `dsv3 serve` refuses it in one line
    before it reads the model (here a directory that does not exist)."""
    from dsv3.cli import main
    from dsv3.serve.guard import default_allowed_hosts
    assert default_allowed_hosts("0.0.0.0", ["a.org:8000", "[::1]:1", "*.b.org", "c.org."]) == \
        ("a.org:8000", "[::1]:1", "*.b.org", "c.org.")
    for bad in ("example.com:abc", "example.com:0", "example.com:65536", ":8000", "[::1]:x"):
        assert main(["serve", "--model", str(tmp_path / "absent"), "--allowed-hosts", f"ok.org,{bad}"]) == 2
        err = capsys.readouterr().err
        assert f"--allowed-hosts: {bad!r}" in err and len(err.strip().splitlines()) == 1, err


def test_an_ep_router_is_refused_before_anything_is_read(tmp_path, capsys):
    """`--ep` is for processes that hold the model: with `--role router` it is refused in one line, before the
    model directory (here one that does not exist) is read."""
    from dsv3.cli import main
    assert main(["serve", "--model", str(tmp_path / "absent"), "--ep", "2", "--role", "router"]) == 2
    err = capsys.readouterr().err
    assert "a router holds none" in err and len(err.strip().splitlines()) == 1, err


def test_aborted_requests_are_a_counter():
    """dsv3_num_requests_aborted was a Gauge set to a count that only grows: a Counter (`_total`), per Prometheus."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from dsv3.serve.metrics import ServerMetrics
    metrics = ServerMetrics(SimpleNamespace(num_pending=0, num_aborted=0))
    handle = SimpleNamespace(first_token=None, submitted=0.0)
    for reason in ("abort", "stop", "abort", None):
        metrics.output(handle, RequestOutput(0, [1], [2], "", reason is not None, reason, [2]))
    stats = dict(running=0, waiting=0, cache_usage=0.0, preemptions=0, spec_proposed=0, spec_accepted=0,
                 torch_threads=1)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(stats).decode())}
    family = families["dsv3_num_requests_aborted"]
    assert family.type == "counter" and [(s.name, s.value) for s in family.samples] == [
        ("dsv3_num_requests_aborted_total", 2.0)]


def test_running_totals_are_counters_advanced_per_scrape():
    """Preemptions, draft tokens proposed / accepted: the engine's running totals, exposed as Counters advanced by
    what they grew since the last scrape (a new engine's totals, lower than the last, count from 0)."""
    from types import SimpleNamespace

    from prometheus_client.parser import text_string_to_metric_families

    from dsv3.serve.metrics import ServerMetrics
    metrics = ServerMetrics(SimpleNamespace(num_pending=0, num_aborted=0))

    def scrape(pre: int, prop: int, acc: int) -> dict:
        stats = dict(running=0, waiting=0, cache_usage=0.0, preemptions=pre, spec_proposed=prop, spec_accepted=acc,
                     torch_threads=1)
        fams = text_string_to_metric_families(metrics.render(stats).decode())
        return {s.name: s.value for f in fams if f.type == "counter" for s in f.samples}
    names = ("dsv3_num_preemptions_total", "dsv3_spec_decode_draft_tokens_total",
             "dsv3_spec_decode_accepted_tokens_total")
    assert [scrape(2, 10, 7)[n] for n in names] == [2, 10, 7]
    assert [scrape(2, 16, 9)[n] for n in names] == [2, 16, 9]
    assert [scrape(1, 4, 4)[n] for n in names] == [3, 20, 13]          # a restarted engine: its totals add


def test_route_labels_are_templates():
    app = FastAPI()
    app.get("/v1/models/{model_id:path}")(lambda model_id: None)
    scope = {"type": "http", "method": "GET", "path_params": {}, "root_path": "", "app": app}
    assert route_label(dict(scope, path="/v1/models/a/b")) == "/v1/models/{model_id:path}"
    assert route_label(dict(scope, path="/x123")) == "unmatched"
    assert route_label(dict(scope, path="/x", route=app.routes[-1])) == "/v1/models/{model_id:path}"


def test_engine_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert engine_threads(None) == 1 and engine_threads(3) == 3           # 2 cores: one is the HTTP process's
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert engine_threads(None) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert engine_threads(None) == 4 and engine_threads(2) == 2


# ---- rendering --------------------------------------------------------------------------------------------------

def test_completion_response_with_echo_and_logprobs(tok):
    req = CompletionRequest(prompt="def f", max_tokens=2, echo=True, logprobs=1)
    plan = plan_completion(req, LIMITS, tok, 64)
    prompt, new = plan.prompt_ids[0], tok.encode(" x")[:1] * 2
    entry = (-0.5, [new[0]], [-0.5])
    out = RequestOutput(0, prompt, new, text=tok.decode(new), finished=True, finish_reason="length",
                        logprobs=[entry, entry], prompt_logprobs=[entry] * (len(prompt) - 1))
    body = completion_response(tok, req, plan, Head("cmpl-1", "text_completion", 7, "m"), [out])
    assert body["id"] == "cmpl-1" and body["created"] == 7 and body["model"] == "m"
    c = body["choices"][0]
    assert c["text"] == "def f" + tok.decode(new) and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["token_logprobs"] == [None] + [-0.5] * (len(prompt) - 1 + 2)
    assert "".join(lp["tokens"]) == c["text"] and lp["text_offset"][0] == 0
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2}
    score = CompletionRequest(prompt="def f", max_tokens=0, echo=True, logprobs=0)      # lm-eval's scoring
    c = completion_response(tok, score, plan, Head("c", "text_completion", 0, "m"), [out])["choices"][0]
    assert c["text"] == "def f" and len(c["logprobs"]["tokens"]) == len(prompt)


def test_chat_response(tok):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=1)
    plan = plan_chat(req, LIMITS, tok, ChatTemplate(), 64)
    out = RequestOutput(0, plan.prompt_ids[0], [9], text=tok.decode([9]), finished=True, finish_reason="stop",
                        logprobs=[(-1.0, [9], [-1.0])])
    body = chat_response(tok, req, plan, Head("chatcmpl-1", "chat.completion", 0, "m"), [out])
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                     "content": tok.decode([9])}
    assert body["choices"][0]["logprobs"]["content"][0]["logprob"] == -1.0
    assert body["usage"]["prompt_tokens"] == len(plan.prompt_ids[0])


def _step_engine():
    """An engine backend (AsyncEngineBase) with no engine behind it: the test hands it steps' outputs (`_on_step`,
    as the engine's thread or pipe reader does), several per wake-up of the event loop when the stream lags."""
    from dsv3.serve.async_engine import AsyncEngineBase

    class StepEngine(AsyncEngineBase):
        alive = True

        def _put(self, command):
            self.commands.append(command)
    aengine = StepEngine(LIMITS, None, 64)
    aengine.commands = []
    return aengine


def _stream_writes(n: int, wake_ups: int, steps_per_wake_up: int) -> tuple[list[str], list[str]]:
    """A stream of n choices through the real merged + coalesced, its outputs delivered `steps_per_wake_up` engine
    steps at a time (one token per choice per step): (the events, the writes)."""
    import asyncio

    from dsv3.infer import SamplingParams
    from dsv3.serve.outputs import coalesced, merged, submit_all

    async def run():
        aengine = _step_engine()
        total = wake_ups * steps_per_wake_up
        handles = submit_all(aengine, [([1, 2, 3], SamplingParams(max_tokens=total))] * n)
        outputs = merged(aengine, handles)
        events: list[str] = []

        async def sse():
            async for k, out in outputs:
                events.append(f"data: {k} {out.new_token_ids} {out.finish_reason}\n\n")
                yield events[-1]
        writes: list[str] = []

        async def consume():
            async for w in coalesced(sse(), outputs):
                writes.append(w)
        consumer = asyncio.create_task(consume())
        step = 0
        for _ in range(wake_ups):
            for _ in range(steps_per_wake_up):
                last = step == total - 1
                aengine._on_step([(h.request_id, RequestOutput(h.request_id, [1, 2, 3], [], finished=last,
                                                               finish_reason="length" if last else None,
                                                               new_token_ids=[10 + step]))
                                  for h in handles])
                step += 1
            await asyncio.sleep(0.01)            # the stream catches up before the next wake-up
        await asyncio.wait_for(consumer, 10)
        assert aengine.num_pending == 0 and not any(c[0] == "abort" for c in aengine.commands)
        return events, writes
    return asyncio.run(run())


@pytest.mark.parametrize("n", [1, 4, 16])
def test_a_lagging_stream_catches_up_in_one_write_per_wake_up(n):
    """A stream whose outputs come several steps at a time (the event loop was busy) joins the events they make
    into one write, for one choice and for several (the choices' outputs are pumped into one queue: that queue's
    backlog is the one that counts; asked of the choices' own queues, always empty, every event went alone)."""
    events, writes = _stream_writes(n, wake_ups=4, steps_per_wake_up=5)
    assert len(events) == n * 20 and "".join(writes) == "".join(events)
    assert len(writes) == 4 < len(events), len(writes)


@pytest.mark.parametrize("n", [1, 4])
def test_a_stream_that_keeps_up_writes_each_step_as_it_comes(n):
    """One step per wake-up: nothing waits behind a step's events, so each step goes out at once (one write per
    event for one choice; a step's n events together, as they came together, for n choices)."""
    events, writes = _stream_writes(n, wake_ups=6, steps_per_wake_up=1)
    assert len(events) == n * 6 and "".join(writes) == "".join(events)
    assert len(writes) == 6, writes
